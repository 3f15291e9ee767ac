"""Qwen2-VL and Qwen2.5-VL: an image keeps its aspect ratio and, within the image processor's min / max pixels,
its resolution.

It becomes ``<|vision_start|>`` + k image tokens + ``<|vision_end|>`` with k = (H/14)(W/14)/merge² for the size
the processor resizes it to, which its own ``get_number_of_image_patches`` gives from the header size alone
(preparation never decodes an image to count). The tensors are the flattened patches ``pixel_values``
[patches, 3·2·14·14] and ``image_grid_thw`` [1, 3]; the model also reads ``mm_token_type_ids`` (1 on image
tokens) to build its 3-D rotary positions, which is also why packed sequences are refused.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field

import torch
from torch import nn

from ..flops import (Block, GridVision, VisionFlops, any_trainable, is_checkpointed, last_linear_macs, linear_macs,
                     projector_block)
from ..image_inputs import DummyImage, ImageLayout, PlannedImages
from .base import Family


@dataclass(frozen=True)
class GridImages(ImageLayout):
    """Tokens from each image's size; flattened patches and image_grid_thw as tensors."""

    tensor_keys = ("pixel_values", "image_grid_thw")
    image_token_id: int
    start_id: int  # <|vision_start|>, written before each image's tokens
    end_id: int  # <|vision_end|>
    image_processor: object = field(compare=False, repr=False)  # counts tokens from a size
    pad: bool = False  # --image-aspect-ratio pad (the processor sees the padded square, so more tokens)

    @property
    def merge(self) -> int:
        return self.image_processor.merge_size

    def token_ids(self, size: tuple[int, int]) -> list[int]:
        w, h = size
        if self.pad:
            w = h = max(w, h)
        n = self.image_processor.get_number_of_image_patches(h, w, {}) // self.merge ** 2
        return [self.start_id] + [self.image_token_id] * n + [self.end_id]

    def tokens_in(self, tensors: dict) -> int:
        return int(tensors["image_grid_thw"].prod(-1).sum()) // self.merge ** 2

    def count_images(self, tensors: dict) -> int:
        return len(tensors["image_grid_thw"]) if "image_grid_thw" in tensors else 0

    def tower_inputs(self, tensors: dict) -> int:  # images (the FLOP model reads their patches from the grids)
        return self.count_images(tensors)

    def grids(self, tensors: dict) -> tuple:
        return tuple(tuple(g) for g in tensors["image_grid_thw"].tolist()) if "image_grid_thw" in tensors else ()

    def identity(self) -> dict:
        settings = self.image_processor.to_dict()  # JSON-able (the prepared directory's prepare.json holds it)
        resize = {k: settings.get(k) for k in ("size", "min_pixels", "max_pixels", "patch_size", "merge_size",
                                               "temporal_patch_size")}
        return {"image_token_id": self.image_token_id, "n_image_tokens": "grid", "vision_start_id": self.start_id,
                "vision_end_id": self.end_id, "pad_to_square": self.pad, "image_processor": resize}

    def dummy(self) -> DummyImage:
        p = self.image_processor
        side = p.patch_size * self.merge  # smart_resize raises it to the processor's min_pixels
        ids = self.token_ids((side, side))
        cells = (len(ids) - 2) * self.merge ** 2  # patches
        h = w = int(round(cells ** 0.5))
        if h * w != cells:  # min_pixels gave a non-square grid: never with a square input, but do not guess
            raise ValueError(f"the image processor resizes a {side}x{side} image to {cells} patches, not a square grid")
        dim = 3 * p.temporal_patch_size * p.patch_size ** 2
        grid = torch.tensor([[1, h, w]])
        return DummyImage(tuple(ids), {"pixel_values": torch.zeros(cells, dim), "image_grid_thw": grid})

    def extra_inputs(self, batch: dict) -> dict:
        # 1 on image tokens: Qwen2-VL builds its 3-D rotary positions from it
        return {"mm_token_type_ids": (batch["input_ids"] == self.image_token_id).long()}


# Files of a processor that the tokenizer and the image processor do not write themselves.
PROCESSOR_FILES = ("processor_config.json", "video_preprocessor_config.json")


class SplitProcessor:
    """A checkpoint's tokenizer and image processor, loaded and saved without transformers' processor class.

    Qwen2-VL's processor cannot even be constructed without torchvision (it checks its video processor's class),
    which CPU machines and many GPU images lack; training needs only the tokenizer and the image processor
    (whose PIL backend transformers picks when torchvision is missing). ``save_pretrained`` writes both, the run's
    chat template as chat_template.jinja, and copies the processor's other files from the source checkpoint, so
    the output loads with ``AutoProcessor`` where torchvision is installed.
    """

    def __init__(self, path: str):
        from transformers import AutoImageProcessor, AutoTokenizer
        self.source = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        legacy = os.path.join(path, "chat_template.json")  # older processors keep their template here
        self.chat_template = self.tokenizer.chat_template
        if self.chat_template is None and os.path.isfile(legacy):
            with open(legacy) as f:
                self.chat_template = json.load(f).get("chat_template")

    def processor_config(self) -> dict:
        """The checkpoint's processor_config.json ({} without one): the processor class's own settings (SmolVLM2's
        ``image_seq_len``, LLaVA-OneVision's ``num_image_tokens`` ...), read without constructing that class."""
        path = os.path.join(self.source, "processor_config.json")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def save_pretrained(self, out: str) -> None:
        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        for name in PROCESSOR_FILES:
            if os.path.isfile(os.path.join(self.source, name)):
                shutil.copy2(os.path.join(self.source, name), os.path.join(out, name))


PLANNED_SIDE = 448  # the planner's image side when --image-size is not given


def size_field(size, key: str):
    """An image processor's ``size`` entry (a dict in saved configs, a SizeDict once loaded); None if unset."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def checkpoint_image_processor(path: str, default=None):
    """The image processor of the checkpoint directory ``path`` (its preprocessor_config.json), else ``default()``
    (None without a default): what the planner reads where a family's tiles are an image-processor setting."""
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        from transformers import AutoImageProcessor
        return AutoImageProcessor.from_pretrained(path)
    return default() if default else None


class Qwen2VL(Family):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    title = "Qwen2-VL and Qwen2.5-VL checkpoints"
    vision_attr = "visual"
    projector_attr = "visual.merger"  # the merger is the projector
    trains = True
    no_packing = ("computes its own 3-D rotary positions per sample (from image_grid_thw), which packed position ids "
                  "would replace")

    def default_aspect(self, stage: str) -> str:
        """Each image keeps its aspect ratio (its own resize; padding would only add tokens)."""
        return "square"

    def load_processor(self, path: str) -> SplitProcessor:
        return SplitProcessor(path)

    def image_layout(self, config, processor, aspect: str) -> GridImages:
        image_processor = processor.image_processor
        for attr in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            if getattr(config, attr, None) is None:
                raise ValueError(f"a {config.model_type} config needs {attr}; the checkpoint's config.json lacks it")
        if not hasattr(image_processor, "get_number_of_image_patches"):
            raise ValueError(f"a {config.model_type} model needs its Qwen2-VL image processor "
                             f"(preprocessor_config.json), got {type(image_processor).__name__}")
        return GridImages(config.image_token_id, config.vision_start_token_id, config.vision_end_token_id,
                          image_processor, pad=aspect == "pad")

    def vision_flops(self, model, parts) -> VisionFlops:
        """The 3-D patch convolution, the vision blocks (every one feeds the merger) and the merger; Qwen2.5-VL's
        blocks outside fullatt_block_indexes attend within windows."""
        vision, vcfg = parts.vision, model.config.vision_config
        conv = next(m for m in vision.modules() if isinstance(m, nn.Conv3d))
        conv_macs = conv.in_channels * math.prod(conv.kernel_size) * conv.out_channels
        blocks = [Block("vision.embed", "vision_embed", conv_macs, conv_macs if conv.weight.requires_grad else 0,
                        input_macs=conv_macs, trainable=any_trainable(conv))]
        window = getattr(vcfg, "window_size", 0) or 0
        full = set(getattr(vcfg, "fullatt_block_indexes", None) or ())
        merge = vcfg.spatial_merge_size
        for i, layer in enumerate(vision.blocks):
            heads = layer.attn.num_heads
            blocks.append(Block(f"vision.{i}", "vision", linear_macs(layer), linear_macs(layer, True), heads=heads,
                                head_dim=layer.attn.qkv.out_features // 3 // heads, trainable=any_trainable(layer),
                                checkpointed=is_checkpointed(vision) and vision.training,
                                tail_macs=last_linear_macs(layer), windowed=bool(window) and i not in full))
        blocks.append(projector_block(parts))
        return VisionFlops(blocks, grid=GridVision(merge, window // merge // vcfg.patch_size if window else 0))

    # The planner: each image resized as the image processor resizes it (smart_resize: sides in multiples of the
    # merged patch, pixels within its bounds); default a square of PLANNED_SIDE
    def planned_image_processor(self, path: str, config):
        """The checkpoint's image processor (its pixel bounds), None without preprocessor_config.json (the class's
        default bounds then)."""
        return checkpoint_image_processor(path)

    def planned_tokens(self, config, image: PlannedImages) -> tuple[int, tuple]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # no torchvision
        v = config.vision_config
        w, h = image.size or (PLANNED_SIDE, PLANNED_SIDE)
        size = getattr(image.image_processor, "size", None)
        low, high = (size_field(size, "shortest_edge"), size_field(size, "longest_edge")) if size else (None, None)
        h, w = smart_resize(h, w, v.patch_size * v.spatial_merge_size,
                            **({"min_pixels": low, "max_pixels": high} if low and high else {}))
        grid = (1, h // v.patch_size, w // v.patch_size)
        return grid[1] * grid[2] // v.spatial_merge_size ** 2, (grid,)

    def planned_vision_inputs(self, config, images: int, dtype: torch.dtype, image: PlannedImages) -> dict:
        """The grid stays on the CPU (its values decide the shapes); the rotary positions computed from it go to
        meta, as do a learned position grid's interpolation indices (Qwen3-VL)."""
        from transformers.vision_utils import get_vision_position_ids

        v = config.vision_config
        grid = torch.tensor(list(self.planned_tokens(config, image)[1]) * images)
        out = {"pixel_values": torch.empty(int(grid.prod(-1).sum()), 3 * v.temporal_patch_size * v.patch_size ** 2,
                                           device="meta", dtype=dtype),
               "image_grid_thw": grid, "position_ids": get_vision_position_ids(grid, v.spatial_merge_size).to("meta")}
        if getattr(v, "num_position_embeddings", None):  # a learned position grid resampled to each image's grid
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights
            index, weight = get_vision_interpolation_indices_and_weights(
                grid, int(v.num_position_embeddings ** 0.5), align_corners=True,
                spatial_merge_size=v.spatial_merge_size)
            out.update(interp_indices=index.to("meta"), interp_weights=weight.to("meta"))
        return out

    def planned_projector_input(self, config, projector: nn.Module, images: int, dtype: torch.dtype,
                                image: PlannedImages) -> torch.Tensor:
        """The merger reads the patches (its norm comes before the 2x2 merge)."""
        v = config.vision_config
        dim = v.embed_dim if hasattr(v, "embed_dim") else v.hidden_size
        patches = sum(t * h * w for t, h, w in self.planned_tokens(config, image)[1]) * images
        return torch.empty(patches, dim, device="meta", dtype=dtype)

    def planned_position_ids(self, config, rows: int, seq: int) -> torch.Tensor:
        return torch.zeros((3, rows, seq), dtype=torch.long, device="meta")  # 3-D rotary positions


FAMILY = Qwen2VL()
