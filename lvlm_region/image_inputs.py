"""What an image becomes: the tokens it takes in the text and the tensors the model reads (the protocol).

Each family (``families/``) supplies an ``ImageLayout``: token ids per image from its size (``token_ids``), what
a prepared sample's token ids depend on (``identity``), the masked image a batch without images gets (``dummy``)
and the model's keyword arguments from a batch (``model_inputs``). Tensors per image come from the image processor
(``images.ImageLoader``) and are concatenated along the first dimension per batch (``IMAGE_KEYS``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Tensors concatenated along dim 0 in a batch: pixels (one row per image, or per tile for tiled families), Qwen2-VL's
# patch grids, LLaVA-NeXT's original sizes, and LLaVA-OneVision's images per sample (one row per sample with images).
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images")


def count_images(tensors: dict) -> int:
    """Images in a sample's or a batch's image tensors: rows of image_grid_thw (Qwen2-VL) or image_sizes
    (LLaVA-NeXT), else rows of pixel_values (InternVL's tiles: its batch has no per-image tensor)."""
    for key in ("image_grid_thw", "image_sizes", "pixel_values"):
        if key in tensors:
            return len(tensors[key])
    return 0


def tower_inputs(tensors: dict) -> int:
    """What the vision tower runs on: images, or tiles for LLaVA-NeXT and InternVL (rows of pixel_values), or
    Qwen2-VL's images (rows of image_grid_thw, whose patches the FLOP model reads from the grids)."""
    for key in ("image_grid_thw", "pixel_values"):
        if key in tensors:
            return len(tensors[key])
    return 0


@dataclass(frozen=True)
class DummyImage:
    """What a batch without images gets so the vision tower still runs (see data.collate): its token ids and
    tensors, which the attention mask and the labels then hide."""

    ids: tuple[int, ...]
    tensors: dict  # IMAGE_KEYS -> tensor, image dimension first


class ImageLayout:
    """How images enter one family's model. Subclasses are frozen dataclasses with an ``image_token_id`` field."""

    image_token_id: int
    # Text the processor writes before and after each image's tokens (Gemma 3: two newlines on either side). It is
    # tokenized together with the neighbouring text (templates.tokenize), so it is not part of token_ids.
    text_around: tuple[str, str] = ("", "")

    def token_ids(self, size: tuple[int, int]) -> list[int]:
        """The token ids of one image of ``size`` (width, height) as the file stores it."""
        raise NotImplementedError

    def sample_token_ids(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """The token ids of each image of one sample, in order. Each image's ``token_ids`` by default; a family whose
        count depends on the sample (LLaVA-OneVision does not tile the images of a multi-image sample) overrides it."""
        return [self.token_ids(size) for size in sizes]

    def load_sample(self, load, paths: list[str]) -> dict:
        """One sample's image tensors (``paths`` not empty): each image through ``load`` (images.ImageLoader),
        concatenated along dim 0. A family whose image processor treats a sample's images together overrides it."""
        loaded = [load(p) for p in paths]
        return {k: torch.cat([t[k] for t in loaded]) for k in loaded[0]}

    def tokens_in(self, tensors: dict) -> int:
        """How many image tokens the model makes of these tensors (an image changed since preparation differs)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What decides the token ids of a prepared sample (a prepared directory must match it); JSON-able."""
        raise NotImplementedError

    def dummy(self) -> DummyImage:
        """A zero image of the smallest size, for batches without images (see data.collate)."""
        raise NotImplementedError

    def extra_inputs(self, batch: dict) -> dict:
        """Model keyword arguments beyond ids, mask, positions and the image tensors (none by default)."""
        return {}

    def model_inputs(self, batch: dict) -> dict:
        """The model's keyword arguments for a collated batch."""
        out = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
               **{k: batch[k] for k in IMAGE_KEYS if k in batch}}
        if batch.get("position_ids") is not None:
            out["position_ids"] = batch["position_ids"]
        out.update(self.extra_inputs(batch))
        return out
