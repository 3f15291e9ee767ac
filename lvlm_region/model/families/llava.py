"""Llava: LLaVA-1.5, Bunny, llava-hf checkpoints and models assembled with --llm/--vision.

Every image is ``n`` copies of the image token (n from the config: patches, + CLS with the "full" feature
strategy; never a hard-coded 576/729) and one [1, 3, H, W] ``pixel_values`` tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..flops import Block, VisionFlops, any_trainable, is_checkpointed, last_linear_macs, linear_macs, projector_block
from ..image_inputs import DummyImage, ImageLayout, PlannedImages
from .base import Family


def class_tokens(vision_config) -> int:
    """Tokens the vision tower adds before its patches: CLIP's class token; SigLIP has none."""
    return 1 if vision_config.model_type == "clip_vision_model" else 0


def image_seq_length(config) -> int:
    """Image tokens per image, from the vision config and feature strategy."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + class_tokens(v) if config.vision_feature_select_strategy == "full" else n


@dataclass(frozen=True)
class FixedImages(ImageLayout):
    """A fixed number of image tokens per image and one [3, H, W] pixel tensor."""

    image_token_id: int
    n_image_tokens: int  # tokens per image
    image_size: int = 0  # the side of the [3, H, W] pixels (for the dummy image)

    def token_ids(self, size: tuple[int, int]) -> list[int]:
        return [self.image_token_id] * self.n_image_tokens

    def tokens_in(self, tensors: dict) -> int:
        return int(tensors["pixel_values"].shape[0]) * self.n_image_tokens

    def identity(self) -> dict:
        return {"image_token_id": self.image_token_id, "n_image_tokens": self.n_image_tokens}

    def dummy(self) -> DummyImage:
        s = self.image_size
        return DummyImage(tuple(self.token_ids((s, s))), {"pixel_values": torch.zeros(1, 3, s, s)})


def _as_list(x) -> list[int]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class Llava(Family):
    model_types = ("llava",)
    title = ("Llava (LLaVA-1.5, Bunny and llava-hf checkpoints, models assembled from an LLM and a CLIP/SigLIP "
             "tower with --llm/--vision)")
    trains = True

    def image_layout(self, config, processor, aspect: str) -> FixedImages:
        return FixedImages(config.image_token_id, image_seq_length(config), image_size=config.vision_config.image_size)

    def vision_flops(self, model, parts) -> VisionFlops:
        """The patch convolution, each encoder layer (those above vision_feature_layer run forward only), the
        projector; every image is the same (image_size / patch_size)² patches."""
        encoder = next(m for m in parts.vision.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList))
        # LLaVA reads hidden_states[vision_feature_layer] (-2: the output of the second-to-last layer); the
        # layers above it still run forward but nothing flows back through them.
        n_used = max(k if k >= 0 else len(encoder.layers) + 1 + k for k in _as_list(model.config.vision_feature_layer))
        blocks, positions, patches = tower_blocks(parts.vision, model.config.vision_config, n_used)
        return VisionFlops(blocks + [projector_block(parts)], image_positions=positions,
                           image_tokens=image_seq_length(model.config), patches=patches)

    def planned_tokens(self, config, image: PlannedImages) -> tuple[int, tuple]:
        return image_seq_length(config), ()

    def planned_projector_input(self, config, projector: nn.Module, images: int, dtype: torch.dtype,
                                image: PlannedImages) -> torch.Tensor:
        """The tower's selected features per image token (several layers' concatenated: the first linear's input)."""
        first = next(m for m in projector.modules() if isinstance(m, nn.Linear))
        return torch.empty(images, image_seq_length(config), first.in_features, device="meta", dtype=dtype)


def tower_blocks(vision: nn.Module, vcfg, n_used: int) -> tuple[list[Block], int, int]:
    """A CLIP / SigLIP tower's FLOP blocks (patch convolution, encoder layers; the first ``n_used`` layers feed the
    projector), its sequence length per image (patches, + CLIP's class token) and its patches per image."""
    embeddings = next(m for m in vision.modules() if hasattr(m, "num_positions"))
    conv = next(m for m in vision.modules() if isinstance(m, nn.Conv2d))
    conv_macs = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    encoder = next(m for m in vision.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList))
    v_heads = vcfg.num_attention_heads
    blocks = [Block("vision.embed", "vision_embed", conv_macs, conv_macs if conv.weight.requires_grad else 0,
                    input_macs=conv_macs, trainable=any_trainable(embeddings))]
    for i, layer in enumerate(encoder.layers):
        blocks.append(Block(f"vision.{i}", "vision", linear_macs(layer), linear_macs(layer, True), heads=v_heads,
                            head_dim=vcfg.hidden_size // v_heads, trainable=any_trainable(layer),
                            checkpointed=is_checkpointed(encoder) and encoder.training, used=i < n_used,
                            tail_macs=last_linear_macs(layer)))
    return blocks, embeddings.num_positions, (vcfg.image_size // vcfg.patch_size) ** 2


FAMILY = Llava()
