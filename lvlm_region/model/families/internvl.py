"""InternVL (``internvl``: transformers' InternVL2.5 / InternVL3 ``-hf`` checkpoints): an InternViT tower, a
pixel-shuffle projector and a Qwen2 / Qwen3 / Llama LLM.

**Tiles.** InternVLProcessor cuts each image into tiles of the tower's input size (GotOcr2ImageProcessor's
``crop_to_patches``, which the processor turns on for every call: between ``min_patches`` and ``max_patches`` tiles on
the grid closest to the image's aspect ratio, plus a thumbnail of the whole image when there is more than one), and
writes ``<img>`` + ``image_seq_length`` x tiles ``<IMG_CONTEXT>`` + ``</img>`` for it. The tile count comes from the
image processor's own ``get_number_of_image_patches`` on the header size, so preparation decodes nothing to count.
The tensors are ``pixel_values`` [tiles, 3, H, W] per image, concatenated over a batch; the tower runs once per tile,
so the FLOP model counts tiles (``count_images`` reads the rows of ``pixel_values``).

**Projector.** ``multi_modal_projector``: a layer norm and two linears on the tower's patches (its class token
dropped) after a pixel shuffle that folds each 2 x 2 patch block into one token of 4x the width (``downsample_ratio``
0.5: 1024 patches of a 448-pixel tile become 256 tokens). The pixel shuffle has no weights.

The processor class itself needs torchvision (its video processor), so the tokenizer and the image processor load
on their own (``qwen2_vl.SplitProcessor``). The image processor gets ``crop_to_patches = True``, what the processor
passes on every call, so training tiles as inference does; the export writes it so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..flops import Block, VisionFlops, any_trainable, is_checkpointed, last_linear_macs, linear_macs, projector_block
from ..image_inputs import DummyImage, ImageLayout, PlannedImages
from .base import Family
from .qwen2_vl import SplitProcessor, checkpoint_image_processor


@dataclass(frozen=True)
class TiledImages(ImageLayout):
    """``<img>`` + tokens_per_tile x tiles ``<IMG_CONTEXT>`` + ``</img>`` per image; [tiles, 3, H, W] pixels."""

    image_token_id: int  # <IMG_CONTEXT>
    start_id: int  # <img>
    end_id: int  # </img>
    tokens_per_tile: int  # config.image_seq_length
    tile: int  # the tower's input side
    image_processor: object = field(compare=False, repr=False)
    pad: bool = False  # --image-aspect-ratio pad: the processor tiles the padded square

    def tiles(self, size: tuple[int, int]) -> int:
        w, h = size
        if self.pad:
            w = h = max(w, h)
        return self.image_processor.get_number_of_image_patches(h, w, {"crop_to_patches": True})

    def token_ids(self, size: tuple[int, int]) -> list[int]:
        return [self.start_id] + [self.image_token_id] * (self.tokens_per_tile * self.tiles(size)) + [self.end_id]

    def tokens_in(self, tensors: dict) -> int:
        return int(tensors["pixel_values"].shape[0]) * self.tokens_per_tile

    def identity(self) -> dict:
        p = self.image_processor
        return {"image_token_id": self.image_token_id, "start_id": self.start_id, "end_id": self.end_id,
                "n_image_tokens": "tiles", "tokens_per_tile": self.tokens_per_tile, "pad_to_square": self.pad,
                "tiles": {"size": dict(p.size), "min_patches": p.min_patches, "max_patches": p.max_patches}}

    def dummy(self) -> DummyImage:
        s = self.tile
        ids = [self.start_id] + [self.image_token_id] * self.tokens_per_tile + [self.end_id]
        return DummyImage(tuple(ids), {"pixel_values": torch.zeros(1, 3, s, s)})


def _side(x) -> int:
    return x[0] if isinstance(x, (list, tuple)) else x


class InternVL(Family):
    model_types = ("internvl",)
    title = "InternVL (InternVL2.5 / InternVL3 -hf checkpoints)"
    trains = True

    def default_aspect(self, stage: str) -> str:
        """The processor's own tiling keeps the aspect ratio; padding would only add tiles."""
        return "square"

    def load_processor(self, path: str) -> SplitProcessor:
        processor = SplitProcessor(path)
        processor.image_processor.crop_to_patches = True  # as InternVLProcessor passes on every call
        return processor

    def image_layout(self, config, processor, aspect: str) -> TiledImages:
        p, tok = processor.image_processor, processor.tokenizer
        if not hasattr(p, "get_number_of_image_patches") or not hasattr(p, "max_patches"):
            raise ValueError(f"an internvl model needs its GotOcr2 image processor (preprocessor_config.json), got "
                             f"{type(p).__name__}")
        v = config.vision_config
        side, patch = _side(v.image_size), _side(v.patch_size)
        size = (p.size["height"], p.size["width"]) if isinstance(p.size, dict) else (p.size.height, p.size.width)
        if size != (side, side):
            raise ValueError(f"the image processor's tiles are {size[0]}x{size[1]}, but the vision tower takes "
                             f"{side}x{side} (vision_config.image_size); fix the image processor's size")
        per_tile = int((side // patch) ** 2 * config.downsample_ratio ** 2)
        if config.image_seq_length != per_tile:
            raise ValueError(f"config.image_seq_length is {config.image_seq_length}, but a {side}-pixel tile in "
                             f"{patch}-pixel patches, pixel-shuffled by {config.downsample_ratio}, gives {per_tile} "
                             "tokens; fix the checkpoint's config.json")
        ids = []
        for attr, default in (("start_image_token", "<img>"), ("end_image_token", "</img>")):
            token = getattr(tok, attr, None) or default
            i = tok.convert_tokens_to_ids(token)
            if i is None or i == tok.unk_token_id:
                raise ValueError(f"the tokenizer has no {token} token ({attr}); InternVL writes each image as "
                                 "<img> + <IMG_CONTEXT> tokens + </img>")
            ids.append(i)
        return TiledImages(config.image_token_id, ids[0], ids[1], per_tile, side, p, pad=aspect == "pad")

    def vision_flops(self, model, parts) -> VisionFlops:
        """InternViT per tile: the patch convolution, each layer over the patches and the class token (layers above
        vision_feature_layer run forward only), then the projector on the pixel-shuffled tokens."""
        vision, v = parts.vision, model.config.vision_config
        conv = next(m for m in vision.modules() if isinstance(m, nn.Conv2d))
        conv_macs = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        encoder = vision.encoder
        blocks = [Block("vision.embed", "vision_embed", conv_macs, conv_macs if conv.weight.requires_grad else 0,
                        input_macs=conv_macs, trainable=any_trainable(vision.embeddings))]
        k = model.config.vision_feature_layer
        n_used = len(encoder.layer) if k == -1 else (k if k >= 0 else len(encoder.layer) + 1 + k)
        heads = v.num_attention_heads
        for i, layer in enumerate(encoder.layer):
            # The layer scale multiplies fc2's output: when it trains, autograd keeps that output, so a checkpointed
            # layer recomputes fc2 too.
            tail = 0 if layer.lambda_2.requires_grad else last_linear_macs(layer)
            blocks.append(Block(f"vision.{i}", "vision", linear_macs(layer), linear_macs(layer, True), heads=heads,
                                head_dim=v.hidden_size // heads, trainable=any_trainable(layer),
                                checkpointed=is_checkpointed(encoder) and encoder.training, used=i < n_used,
                                tail_macs=tail))
        patches = (_side(v.image_size) // _side(v.patch_size)) ** 2
        return VisionFlops(blocks + [projector_block(parts)], image_positions=patches + 1,
                           image_tokens=model.config.image_seq_length, patches=patches)

    # The planner: each image (default: the square of the largest square grid max_patches allows) cut into tiles as
    # the image processor cuts it, the tower and the projector run per tile
    def planned_image_processor(self, path: str, config):
        """The checkpoint's GotOcr2 image processor (min_patches, max_patches), or the class's defaults at the tower's
        side without preprocessor_config.json; crop_to_patches on, as InternVLProcessor calls it."""
        from transformers import GotOcr2ImageProcessorPil
        side = _side(config.vision_config.image_size)
        processor = checkpoint_image_processor(path, lambda: GotOcr2ImageProcessorPil(size={"height": side,
                                                                                             "width": side}))
        processor.crop_to_patches = True
        return processor

    def planned_size(self, config, image: PlannedImages) -> tuple[int, int]:
        side = _side(config.vision_config.image_size) * math.isqrt(image.image_processor.max_patches)
        return image.size or (side, side)

    def planned_tiles(self, config, image: PlannedImages) -> int:
        w, h = self.planned_size(config, image)
        return image.image_processor.get_number_of_image_patches(h, w, {"crop_to_patches": True})

    def planned_tokens(self, config, image: PlannedImages) -> tuple[int, tuple]:
        """<img>, image_seq_length per tile, </img>."""
        return self.planned_tiles(config, image) * config.image_seq_length + 2, ()

    def planned_projector_input(self, config, projector, images: int, dtype: torch.dtype,
                                image: PlannedImages) -> torch.Tensor:
        """The pixel-shuffled patches of every tile (the projector's layer norm reads their widened features)."""
        first = next(m for m in projector.modules() if isinstance(m, nn.Linear))
        n = images * self.planned_tiles(config, image)
        return torch.empty(n, config.image_seq_length, first.in_features, device="meta", dtype=dtype)


FAMILY = InternVL()
