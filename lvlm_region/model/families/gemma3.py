"""Gemma 3 (``gemma3``): a SigLIP tower, a projector that average-pools the patches to ``mm_tokens_per_image`` soft
tokens (256 in the released models), RMS-normalises them and multiplies them by one weight matrix, and a Gemma 3 LLM
whose embeddings and LM head are one tensor.

Each image is written as Gemma3Processor writes it (its ``full_image_sequence``): two newlines, ``<start_of_image>``,
the soft tokens, ``<end_of_image>``, two newlines. The newlines are text, tokenized with the text next to them as the
processor's expansion is (``ImageLayout.text_around``), so prepared ids equal the processor's. The processor resizes
every image to the tower's square input, so every image gives the same tokens. The model reads ``token_type_ids``
(1 on soft tokens): an image's soft tokens attend to each other bidirectionally. Pan-and-scan crops
(``do_pan_and_scan``) are not supported and refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flops import Block, VisionFlops, any_trainable
from ..image_inputs import DummyImage, ImageLayout, PlannedImages
from .base import Family
from .llava import tower_blocks

AROUND = ("\n\n", "\n\n")  # Gemma3Processor.full_image_sequence: "\n\n" + boi + soft tokens + eoi + "\n\n"


@dataclass(frozen=True)
class SoftTokenImages(ImageLayout):
    """``<start_of_image>`` + n soft tokens + ``<end_of_image>`` per image (newlines around as text), one
    [3, H, W] pixel tensor per image."""

    image_token_id: int  # the soft token (<image_soft_token>)
    boi_id: int
    eoi_id: int
    n_image_tokens: int  # mm_tokens_per_image
    image_size: int
    text_around: tuple[str, str] = AROUND

    def token_ids(self, size: tuple[int, int]) -> list[int]:
        return [self.boi_id] + [self.image_token_id] * self.n_image_tokens + [self.eoi_id]

    def tokens_in(self, tensors: dict) -> int:
        return int(tensors["pixel_values"].shape[0]) * self.n_image_tokens

    def identity(self) -> dict:
        return {"image_token_id": self.image_token_id, "n_image_tokens": self.n_image_tokens,
                "boi_id": self.boi_id, "eoi_id": self.eoi_id, "text_around": list(self.text_around)}

    def dummy(self) -> DummyImage:
        s = self.image_size
        return DummyImage(tuple(self.token_ids((s, s))), {"pixel_values": torch.zeros(1, 3, s, s)})

    def extra_inputs(self, batch: dict) -> dict:
        # 1 on soft tokens: the model lets an image's soft tokens attend to each other in both directions
        return {"token_type_ids": (batch["input_ids"] == self.image_token_id).long()}


class Gemma3(Family):
    model_types = ("gemma3",)
    title = "Gemma 3 (gemma-3-4b/12b/27b)"
    trains = True
    no_packing = ("builds its bidirectional image attention from token_type_ids per row, which packed rows would "
                  "carry across samples; not tested with packing")

    def default_aspect(self, stage: str) -> str:
        """The processor's own resize to the tower's square input (as Gemma 3 was trained); pad adds borders."""
        return "square"

    def image_layout(self, config, processor, aspect: str) -> SoftTokenImages:
        image_processor = processor.image_processor
        if getattr(image_processor, "do_pan_and_scan", False):
            raise ValueError("the image processor has do_pan_and_scan on: pan-and-scan crops are not supported for "
                             "training; set \"do_pan_and_scan\": false in the checkpoint's image processor config "
                             "(preprocessor_config.json, or processor_config.json's image_processor)")
        for attr in ("image_token_id", "boi_token_id", "eoi_token_id", "mm_tokens_per_image"):
            if getattr(config, attr, None) is None:
                raise ValueError(f"a gemma3 config needs {attr}; the checkpoint's config.json lacks it")
        size, side = getattr(image_processor, "size", None), config.vision_config.image_size
        hw = tuple(size[k] if isinstance(size, dict) else getattr(size, k, None) for k in ("height", "width"))
        if hw != (side, side):
            raise ValueError(f"the image processor resizes to {hw[0]}x{hw[1]}, but the vision tower takes "
                             f"{side}x{side} (vision_config.image_size); fix the image processor's size")
        return SoftTokenImages(config.image_token_id, config.boi_token_id, config.eoi_token_id,
                               config.mm_tokens_per_image, side)

    def vision_flops(self, model, parts) -> VisionFlops:
        """The SigLIP tower (every layer feeds the projector: Gemma 3 reads its last hidden state), then the
        projector on the pooled tokens: its one matmul (vision hidden x text hidden) per soft token. The average
        pool and the RMS norm are element-wise (not counted, as torch.utils.flop_counter does not); the pool is why the
        matmul runs on mm_tokens_per_image tokens, not on the patches. The norm's scale trains with the projector,
        so the matmul's input gradient is needed then."""
        blocks, positions, patches = tower_blocks(parts.vision, model.config.vision_config,
                                                  model.config.vision_config.num_hidden_layers)
        proj = parts.projector
        weight = proj.mm_input_projection_weight
        rows, cols = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3 keeps the full shape in ds_shape
        macs = rows * cols
        norm_trains = any_trainable(proj.mm_soft_emb_norm)
        blocks.append(Block("projector", "projector", macs, macs if weight.requires_grad else 0,
                            input_macs=0 if norm_trains else macs, trainable=any_trainable(proj)))
        # Gemma 3's decoder layers normalise the MLP output (post_feedforward_layernorm) before the residual add.
        return VisionFlops(blocks, image_positions=positions, image_tokens=model.config.mm_tokens_per_image,
                           patches=patches, mlp_output_norm=True)

    # The planner: mm_tokens_per_image soft tokens per image; the projector pools the tower's patches
    def planned_tokens(self, config, image: PlannedImages) -> tuple[int, tuple]:
        return config.mm_tokens_per_image, ()

    def planned_projector_input(self, config, projector, images: int, dtype: torch.dtype,
                                image: PlannedImages) -> torch.Tensor:
        v = config.vision_config
        return torch.empty(images, (v.image_size // v.patch_size) ** 2, v.hidden_size, device="meta", dtype=dtype)

    def planned_layer_kwargs(self, config, decoder, hidden: torch.Tensor, position_ids: torch.Tensor) -> list[dict]:
        """Each layer's rotary embedding is its layer type's (sliding: local base frequency, full: global), as
        Gemma3TextModel computes them, and a materialised [rows, 1, T, T] mask of its own in the compute dtype: the
        image tokens attend to each other both ways, so attention runs with an explicit mask, which sdpa keeps per
        layer for the backward (measured on the tiny model: one mask per layer)."""
        types = config.get_text_config().layer_types
        rotary = {t: decoder.rotary_emb(hidden, position_ids, t) for t in set(types)}
        rows, seq = hidden.shape[:2]
        return [{"position_embeddings": rotary[t], "position_ids": position_ids,
                 "attention_mask": torch.empty(rows, 1, seq, seq, device="meta", dtype=hidden.dtype)} for t in types]


FAMILY = Gemma3()
