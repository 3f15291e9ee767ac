"""LLaVA-OneVision (``llava_onevision``: the llava-hf ``llava-onevision-*-hf`` checkpoints): LLaVA-NeXT's anyres
tiling, except that an image of a multi-image sample is not tiled.

A sample with one image: its anyres tiles (base tile first), the model unpads the grid's features, shrinks them by
bilinear interpolation when they exceed ``vision_aspect_ratio`` (``anyres_max_9``: nine tiles' worth) and appends
``image_newline`` after each row. A sample with several images: each image padded to a square in the mean colour
and resized to one tile, its features followed by one ``image_newline``. The model reads ``batch_num_images`` (images
per sample) to tell the two apart, so a sample's images are processed together (``load_sample``: the image processor
gets them as one nested list, as LlavaOnevisionProcessor passes them) and counted together (``sample_token_ids``).

The counts are LlavaOnevisionProcessor's own ``replace_image_token``, the method its ``__call__`` expands each
``<image>`` with. The processor class itself cannot be constructed without torchvision (its ``__init__`` checks the
video processor's class even when there is none), so the checkpoint's tokenizer and image processor load on their own
(qwen2_vl.SplitProcessor), and the counting method runs on an instance holding what it reads: the image processor,
and ``num_image_tokens``, ``vision_feature_select_strategy`` and ``vision_aspect_ratio`` from processor_config.json.
Tensors: ``pixel_values`` [tiles, 3, H, W] per sample (one row per image of a multi-image sample), ``image_sizes``
[images, 2], ``batch_num_images`` [1]; concatenated over a batch (the model takes the 4-D form). ``image_newline``
trains with the projector. Videos are not supported for training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..image_inputs import DummyImage, ImageLayout, PlannedImages
from .llava_next import LlavaNext
from .qwen2_vl import SplitProcessor

SETTINGS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")


def counter(image_processor, settings: dict):
    """LlavaOnevisionProcessor with what its ``replace_image_token`` reads, without its ``__init__`` (see above)."""
    from transformers import LlavaOnevisionProcessor
    proc = object.__new__(LlavaOnevisionProcessor)
    proc.image_processor, proc.image_token = image_processor, "<image>"
    for k in SETTINGS:
        setattr(proc, k, settings[k])
    return proc


@dataclass(frozen=True)
class OnevisionImages(ImageLayout):
    """Tokens per image from the processor's own count, which depends on the image's size and on whether its sample
    has other images; tiles, sizes and images per sample as tensors."""

    tensor_keys = ("pixel_values", "image_sizes", "batch_num_images")
    image_token_id: int
    tile: int  # the tower's input side (one tile)
    pinpoints: tuple  # image_grid_pinpoints
    settings: tuple  # (num_image_tokens, vision_feature_select_strategy, vision_aspect_ratio)
    processor: object = field(compare=False, repr=False)  # counter(): LlavaOnevisionProcessor.replace_image_token
    pad: bool = False  # --image-aspect-ratio pad: the processor sees the padded square

    def count(self, height: int, width: int, images_in_sample: int) -> int:
        inputs = {"batch_num_images": [images_in_sample], "image_sizes": [[height, width]],
                  "pixel_values": [torch.empty(1, 3, self.tile, self.tile)]}  # it reads the tile's size from these
        return self.processor.replace_image_token(inputs, image_idx=0).count(self.processor.image_token)

    def token_ids(self, size: tuple[int, int]) -> list[int]:
        return self.sample_token_ids([size])[0]

    def sample_token_ids(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        out = []
        for w, h in sizes:
            if self.pad:
                w = h = max(w, h)
            out.append([self.image_token_id] * self.count(h, w, len(sizes)))
        return out

    def load_sample(self, load, paths: list[str]) -> dict:
        """The sample's images through the image processor together (one nested list: it tiles a lone image and pads
        and resizes each image of several to one tile); the padding of the [images, max tiles, ...] batch dropped."""
        out = load.processor([[load.rgb(p) for p in paths]], return_tensors="pt")
        tiles = 1 if len(paths) > 1 else out["pixel_values"].shape[1]
        return {"pixel_values": out["pixel_values"][:, :tiles].flatten(0, 1), "image_sizes": out["image_sizes"],
                "batch_num_images": out["batch_num_images"]}

    def tokens_in(self, tensors: dict) -> int:
        sizes = tensors["image_sizes"].tolist()  # load_sample and dummy always give batch_num_images
        total, start = 0, 0
        for n in tensors["batch_num_images"].tolist():
            total += sum(self.count(h, w, n) for h, w in sizes[start:start + n])
            start += n
        return total

    def count_images(self, tensors: dict) -> int:  # pixel_values holds tiles; image_sizes one row per image
        return len(tensors["image_sizes"]) if "image_sizes" in tensors else 0

    def identity(self) -> dict:
        return {"image_token_id": self.image_token_id, "n_image_tokens": "anyres (onevision)", "tile": self.tile,
                "image_grid_pinpoints": [list(x) for x in self.pinpoints], "pad_to_square": self.pad,
                **dict(zip(SETTINGS, self.settings))}

    def dummy(self) -> DummyImage:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
        s = self.tile
        tiles = image_size_to_num_patches((s, s), [list(x) for x in self.pinpoints], s)
        return DummyImage(tuple(self.token_ids((s, s))), {"pixel_values": torch.zeros(tiles, 3, s, s),
                                                          "image_sizes": torch.tensor([[s, s]]),
                                                          "batch_num_images": torch.tensor([1])})


class LlavaOnevision(LlavaNext):
    model_types = ("llava_onevision",)
    title = "LLaVA-OneVision (llava-hf llava-onevision-*-hf checkpoints)"

    def load_processor(self, path: str) -> SplitProcessor:
        processor = SplitProcessor(path)
        processor.settings = {k: v for k, v in processor.processor_config().items() if k in SETTINGS}
        return processor

    def image_layout(self, config, processor, aspect: str) -> OnevisionImages:
        v, ip = config.vision_config, processor.image_processor
        settings = getattr(processor, "settings", {})
        patches = (v.image_size // v.patch_size) ** 2
        strategy = config.vision_feature_select_strategy
        want = {"num_image_tokens": patches + (strategy == "default"), "vision_feature_select_strategy": strategy,
                "vision_aspect_ratio": config.vision_aspect_ratio}
        got = {k: settings.get(k) for k in SETTINGS}
        if got != want:
            raise ValueError(f"processor_config.json's {got} differ from what the model computes {want} (config.json); "
                             "the processor would count other image tokens than the model makes; fix "
                             "processor_config.json")
        size = ip.size
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        side = get("height") or get("shortest_edge")  # the tile: every patch is resized to it
        pinpoints = [list(x) for x in ip.image_grid_pinpoints]
        if side != v.image_size or pinpoints != [list(x) for x in config.image_grid_pinpoints]:
            raise ValueError(f"the image processor's tiles ({side} px) and image_grid_pinpoints ({pinpoints}) must be "
                             f"the model's ({v.image_size} px, {config.image_grid_pinpoints}); fix "
                             "preprocessor_config.json")
        return OnevisionImages(config.image_token_id, side, tuple(tuple(x) for x in pinpoints),
                               tuple(want[k] for k in SETTINGS), counter(ip, want), pad=aspect == "pad")

    # The planner: LLaVA-NeXT's, except that an image of a multi-image sample is one tile, and the tokens are
    # LlavaOnevisionProcessor's own count (anyres_max's shrinking included) on the config's settings
    def planned_tiles(self, config, image: PlannedImages) -> int:
        return super().planned_tiles(config, image) if image.per_sample == 1 else 1

    def planned_tokens(self, config, image: PlannedImages) -> tuple[int, tuple]:
        v = config.vision_config
        strategy = config.vision_feature_select_strategy
        settings = {"num_image_tokens": (v.image_size // v.patch_size) ** 2 + (strategy == "default"),
                    "vision_feature_select_strategy": strategy, "vision_aspect_ratio": config.vision_aspect_ratio}
        w, h = self.planned_size(config, image)
        images = OnevisionImages(config.image_token_id, v.image_size, (), (),
                                 counter(SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints), settings))
        return images.count(h, w, image.per_sample), ()

    def planned_vision_inputs(self, config, images: int, dtype: torch.dtype, image: PlannedImages) -> dict:
        per_sample = image.per_sample
        return {**super().planned_vision_inputs(config, images, dtype, image),
                "batch_num_images": torch.tensor([per_sample] * (images // per_sample))}


FAMILY = LlavaOnevision()
