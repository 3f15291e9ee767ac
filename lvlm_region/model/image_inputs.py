"""What an image becomes: the tokens it takes in the text and the tensors the model reads (the protocol).

Each family (``families/``) supplies an ``ImageLayout``: token ids per image from its size (``token_ids``), what
a prepared sample's token ids depend on (``identity``), the masked image a batch without images gets (``dummy``)
and the model's keyword arguments from a batch (``model_inputs``). Tensors per image come from the image processor
(``images.ImageLoader``) and are concatenated along the first dimension per batch (the layout's ``tensor_keys``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class PlannedImages:
    """The images the planner plans for: each ``size`` (width, height; None: the family's default), ``per_sample`` in a
    sample, and the checkpoint's image processor where the family's tiles or tokens depend on its settings (the
    family's ``planned_image_processor``; None where the config decides them)."""

    size: tuple[int, int] | None = None
    per_sample: int = 1
    image_processor: object = None


@dataclass(frozen=True)
class DummyImage:
    """What a batch without images gets so the vision tower still runs (see data.collate): its token ids and
    tensors, which the attention mask and the labels then hide."""

    ids: tuple[int, ...]
    tensors: dict  # the layout's tensor_keys -> tensor, image dimension first


class ImageLayout:
    """How images enter one family's model. Subclasses are frozen dataclasses with an ``image_token_id`` field."""

    image_token_id: int
    # The tensors of a sample's images, concatenated along dim 0 in a batch: pixels (one row per image, or per tile for
    # a tiled family) and whatever else the family's model reads per image (a subclass sets it, without annotation)
    tensor_keys: tuple[str, ...] = ("pixel_values",)
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

    def count_images(self, tensors: dict) -> int:
        """Images in a sample's or a batch's image tensors: rows of pixel_values by default (a tiled family without a
        per-image tensor, InternVL, counts its tiles)."""
        return len(tensors["pixel_values"]) if "pixel_values" in tensors else 0

    def tower_inputs(self, tensors: dict) -> int:
        """What the vision tower runs on in a batch: images, or tiles for a tiled family (rows of pixel_values)."""
        return len(tensors["pixel_values"]) if "pixel_values" in tensors else 0

    def grids(self, tensors: dict) -> tuple:
        """Each image's patch grid (t, h, w) for the FLOP model, where a family's patch count varies per image
        (none by default: fixed-size images)."""
        return ()

    def extra_inputs(self, batch: dict) -> dict:
        """Model keyword arguments beyond ids, mask, positions and the image tensors (none by default)."""
        return {}

    def model_inputs(self, batch: dict) -> dict:
        """The model's keyword arguments for a collated batch."""
        out = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
               **{k: batch[k] for k in self.tensor_keys if k in batch}}
        if batch.get("position_ids") is not None:
            out["position_ids"] = batch["position_ids"]
        out.update(self.extra_inputs(batch))
        return out
