"""LLaVA-NeXT (``llava_next``: llava-v1.6 and llava-hf ``llava-v1.6-*`` checkpoints): anyres tiling.

LlavaNextProcessor picks, per image, the resolution of ``image_grid_pinpoints`` that fits it best, cuts the resized
and padded image into tiles of the tower's input size and adds a base tile of the whole image; the model projects every
tile (the projector runs on each tile's patches), drops the padding's features (unpad) and appends
``image_newline`` after each row of the grid. The number of image tokens is the processor's own
``_get_num_multimodal_tokens`` on the header size (original height and width), so preparation decodes nothing to
count. The tensors are ``pixel_values`` [tiles, 3, H, W] and ``image_sizes`` [1, 2] per image, concatenated over a
batch (the model takes the 4-D form). ``image_newline`` trains with the projector.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..image_inputs import DummyImage, ImageLayout, PlannedImages
from .llava import Llava, class_tokens


@dataclass(frozen=True)
class AnyresImages(ImageLayout):
    """n image tokens per image, n from the processor's arithmetic on its size; tiles and the size as tensors."""

    tensor_keys = ("pixel_values", "image_sizes")
    image_token_id: int
    tile: int  # the tower's input side (one tile)
    pinpoints: tuple  # image_grid_pinpoints
    processor: object = field(compare=False, repr=False)  # LlavaNextProcessor: counts tokens from a size
    pad: bool = False  # --image-aspect-ratio pad: the processor sees the padded square

    def count(self, height: int, width: int) -> int:
        return int(self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0])

    def token_ids(self, size: tuple[int, int]) -> list[int]:
        w, h = size
        if self.pad:
            w = h = max(w, h)
        return [self.image_token_id] * self.count(h, w)

    def tokens_in(self, tensors: dict) -> int:
        return sum(self.count(int(h), int(w)) for h, w in tensors["image_sizes"].tolist())

    def count_images(self, tensors: dict) -> int:  # pixel_values holds tiles; image_sizes one row per image
        return len(tensors["image_sizes"]) if "image_sizes" in tensors else 0

    def identity(self) -> dict:
        p = self.processor
        return {"image_token_id": self.image_token_id, "n_image_tokens": "anyres", "tile": self.tile,
                "image_grid_pinpoints": [list(x) for x in self.pinpoints], "pad_to_square": self.pad,
                "vision_feature_select_strategy": p.vision_feature_select_strategy,
                "num_additional_image_tokens": p.num_additional_image_tokens}

    def dummy(self) -> DummyImage:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        s = self.tile
        tiles = image_size_to_num_patches((s, s), [list(x) for x in self.pinpoints], s)
        return DummyImage(tuple(self.token_ids((s, s))), {"pixel_values": torch.zeros(tiles, 3, s, s),
                                                          "image_sizes": torch.tensor([[s, s]])})


class LlavaNext(Llava):
    model_types = ("llava_next",)
    title = "LLaVA-NeXT (llava-v1.6 / llava-hf llava-v1.6-* checkpoints)"
    projector_extra_attrs = ("image_newline",)  # trains with the projector

    def default_aspect(self, stage: str) -> str:
        """The processor's own anyres resize and padding (as LLaVA-NeXT trains); pad would add tokens."""
        return "square"

    def image_layout(self, config, processor, aspect: str) -> AnyresImages:
        if not hasattr(processor, "_get_num_multimodal_tokens") or not hasattr(processor, "patch_size"):
            raise ValueError(f"a llava_next model needs its LlavaNextProcessor (processor_config.json), got "
                             f"{type(processor).__name__}")
        v, ip = config.vision_config, processor.image_processor
        want = {"patch_size": v.patch_size, "vision_feature_select_strategy": config.vision_feature_select_strategy,
                "num_additional_image_tokens": class_tokens(v)}
        got = {k: getattr(processor, k, None) for k in want}
        if got != want:
            raise ValueError(f"the processor's {got} differ from what the model computes {want} (config.json); the "
                             "processor would count other image tokens than the model makes; fix processor_config.json")
        crop = ip.crop_size
        side = crop["height"] if isinstance(crop, dict) else crop.height
        pinpoints = [list(x) for x in ip.image_grid_pinpoints]
        if side != v.image_size or pinpoints != [list(x) for x in config.image_grid_pinpoints]:
            raise ValueError(f"the image processor's tiles ({side} px) and image_grid_pinpoints ({pinpoints}) must be "
                             f"the model's ({v.image_size} px, {config.image_grid_pinpoints}); fix "
                             "preprocessor_config.json")
        return AnyresImages(config.image_token_id, side, tuple(tuple(x) for x in pinpoints), processor,
                            pad=aspect == "pad")


    # The planner: each image (default: a square of the largest grid pinpoint's side, the most tiles: an upper bound)
    # is the base tile plus its grid pinpoint's tiles through the tower and the projector
    def planned_size(self, config, image: PlannedImages) -> tuple[int, int]:
        """(width, height) of the planned image."""
        side = max(max(p) for p in config.image_grid_pinpoints)
        return image.size or (side, side)

    def planned_tiles(self, config, image: PlannedImages) -> int:
        """Tower inputs per image: the base tile and the tiles of the grid pinpoint its size selects."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        w, h = self.planned_size(config, image)
        return int(image_size_to_num_patches((h, w), config.image_grid_pinpoints, config.vision_config.image_size))

    def planned_tokens(self, config, image: PlannedImages) -> tuple[int, tuple]:
        """LlavaNextProcessor's own count (its _get_number_of_features, on what it reads, taken from the config): the
        base tile's features, the grid's features with the padding of the image's aspect removed, and a newline per
        row of them."""
        from types import SimpleNamespace

        from transformers import LlavaNextProcessor
        v = config.vision_config
        proc = object.__new__(LlavaNextProcessor)
        proc.image_processor = SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints)
        proc.patch_size, proc.num_additional_image_tokens = v.patch_size, class_tokens(v)
        w, h = self.planned_size(config, image)
        n = proc._get_number_of_features(h, w, v.image_size, v.image_size)
        return n - (config.vision_feature_select_strategy == "default"), ()

    def planned_vision_inputs(self, config, images: int, dtype: torch.dtype, image: PlannedImages) -> dict:
        w, h = self.planned_size(config, image)
        return {**super().planned_vision_inputs(config, images, dtype, image),
                "image_sizes": torch.tensor([[h, w]] * images)}

    def planned_projector_input(self, config, projector, images: int, dtype: torch.dtype,
                                image: PlannedImages) -> torch.Tensor:
        return super().planned_projector_input(config, projector, images * self.planned_tiles(config, image), dtype,
                                               image)


FAMILY = LlavaNext()
