"""What an image becomes for each model family: the tokens it takes in the text and the tensors the model reads.

Two layouts cover the families this pipeline trains:

- ``fixed`` (Llava: LLaVA-1.5, Bunny, llava-hf checkpoints, models assembled with --llm/--vision): every image is
  ``n`` copies of the image token (n from the config: patches, + CLS with the "full" strategy) and one
  [1, 3, H, W] ``pixel_values`` tensor.
- ``grid`` (Qwen2-VL, Qwen2.5-VL): an image keeps its aspect ratio and, within the image processor's min / max
  pixels, its resolution. It becomes ``<|vision_start|>`` + k image tokens + ``<|vision_end|>`` with
  k = (H/14)(W/14)/merge² for the size the processor resizes it to, which its own ``get_number_of_image_patches``
  gives from the header size alone (preparation never decodes an image to count). The tensors are the flattened
  patches ``pixel_values`` [patches, 3·2·14·14] and ``image_grid_thw`` [1, 3]; the model also reads
  ``mm_token_type_ids`` (1 on image tokens) to build its 3-D rotary positions.

Either way the data path is the same: token ids per image from its size (``token_ids``), tensors per image from
the image processor (``images.ImageLoader``), concatenated along the first dimension per batch, and the model's
keyword arguments from a batch (``model_inputs``).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch

GRID_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
FIXED_FAMILIES = ("llava",)
IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # per-image tensors, concatenated along dim 0 in a batch


def count_images(tensors: dict) -> int:
    """Images in a sample's or a batch's image tensors: rows of image_grid_thw (Qwen2-VL), else of pixel_values."""
    if "image_grid_thw" in tensors:
        return len(tensors["image_grid_thw"])
    return len(tensors["pixel_values"]) if "pixel_values" in tensors else 0


@dataclass(frozen=True)
class DummyImage:
    """What a batch without images gets so the vision tower still runs (see data.collate): its token ids and
    tensors, which the attention mask and the labels then hide."""

    ids: tuple[int, ...]
    tensors: dict  # IMAGE_KEYS -> tensor, image dimension first


@dataclass(frozen=True)
class ImageLayout:
    """How images enter a family's model (see the module docstring)."""

    kind: str  # "fixed" | "grid"
    image_token_id: int
    n_image_tokens: int = 0  # fixed: tokens per image
    start_id: int | None = None  # grid: <|vision_start|>, written before each image's tokens
    end_id: int | None = None  # grid: <|vision_end|>
    pad: bool = False  # grid: --image-aspect-ratio pad (the processor sees the padded square, so more tokens)
    image_processor: object = field(default=None, compare=False, repr=False)  # grid: counts tokens from a size
    image_size: int = 0  # fixed: the side of the [3, H, W] pixels (for the dummy image)

    @property
    def merge(self) -> int:
        return self.image_processor.merge_size if self.kind == "grid" else 1

    def token_ids(self, size: tuple[int, int]) -> list[int]:
        """The token ids of one image of ``size`` (width, height) as the file stores it."""
        if self.kind == "fixed":
            return [self.image_token_id] * self.n_image_tokens
        w, h = size
        if self.pad:
            w = h = max(w, h)
        n = self.image_processor.get_number_of_image_patches(h, w, {}) // self.merge ** 2
        return [self.start_id] + [self.image_token_id] * n + [self.end_id]

    def tokens_in(self, tensors: dict) -> int:
        """How many image tokens the model makes of these tensors (an image changed since preparation differs)."""
        if self.kind == "fixed":
            return int(tensors["pixel_values"].shape[0]) * self.n_image_tokens
        return int(tensors["image_grid_thw"].prod(-1).sum()) // self.merge ** 2

    def identity(self) -> dict:
        """What decides the token ids of a prepared sample (a prepared directory must match it)."""
        if self.kind == "fixed":
            return {"image_token_id": self.image_token_id, "n_image_tokens": self.n_image_tokens}
        settings = self.image_processor.to_dict()  # JSON-able (the prepared directory's prepare.json holds it)
        resize = {k: settings.get(k) for k in ("size", "min_pixels", "max_pixels", "patch_size", "merge_size",
                                               "temporal_patch_size")}
        return {"image_token_id": self.image_token_id, "n_image_tokens": "grid", "vision_start_id": self.start_id,
                "vision_end_id": self.end_id, "pad_to_square": self.pad, "image_processor": resize}

    def dummy(self) -> DummyImage:
        """A zero image of the smallest size, for batches without images (see data.collate)."""
        if self.kind == "fixed":
            s = self.image_size
            return DummyImage(tuple(self.token_ids((s, s))), {"pixel_values": torch.zeros(1, 3, s, s)})
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

    def model_inputs(self, batch: dict) -> dict:
        """The model's keyword arguments for a collated batch."""
        out = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
               **{k: batch[k] for k in IMAGE_KEYS if k in batch}}
        if batch.get("position_ids") is not None:
            out["position_ids"] = batch["position_ids"]
        if self.kind == "grid":  # 1 on image tokens: Qwen2-VL builds its 3-D rotary positions from it
            out["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return out


def default_aspect(stage: str, model_type: str | None) -> str:
    """--image-aspect-ratio when not given: Qwen2-VL keeps each image's aspect ratio (its own resize; padding would
    only add tokens); otherwise as LLaVA-1.5, square crops for stage 1 and padding to a square for SFT."""
    if model_type in GRID_FAMILIES or stage == "pretrain":
        return "square"
    return "pad"


def for_config(config, image_processor, aspect: str) -> ImageLayout:
    """The layout of a model config (its family) with its image processor and --image-aspect-ratio."""
    family = config.model_type
    if family in FIXED_FAMILIES:
        from .model import image_seq_length
        return ImageLayout("fixed", config.image_token_id, image_seq_length(config),
                           image_size=config.vision_config.image_size)
    if family in GRID_FAMILIES:
        for attr in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            if getattr(config, attr, None) is None:
                raise ValueError(f"a {family} config needs {attr}; the checkpoint's config.json lacks it")
        if not hasattr(image_processor, "get_number_of_image_patches"):
            raise ValueError(f"a {family} model needs its Qwen2-VL image processor (preprocessor_config.json), got "
                             f"{type(image_processor).__name__}")
        return ImageLayout("grid", config.image_token_id, start_id=config.vision_start_token_id,
                           end_id=config.vision_end_token_id, pad=aspect == "pad", image_processor=image_processor)
    raise ValueError(f"no image layout for {family}")


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

    def save_pretrained(self, out: str) -> None:
        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        for name in PROCESSOR_FILES:
            if os.path.isfile(os.path.join(self.source, name)):
                shutil.copy2(os.path.join(self.source, name), os.path.join(out, name))
