"""Idefics3 (``idefics3``: Idefics3-8B, SmolVLM-256M/500M/2B-Instruct): image splitting and a pixel-shuffle connector.

**Tokens.** Idefics3Processor resizes an image (longest edge to the processor's ``size``) and, with
``do_image_splitting``, cuts it into rows x cols tiles of ``max_image_size`` plus a global image; its text is
``<fake_token_around_image><row_r_col_c>`` + ``image_seq_len`` x ``<image>`` per tile, a newline after each row, then
``\\n<fake_token_around_image><global-img>`` + ``image_seq_len`` x ``<image>`` + ``<fake_token_around_image>`` (a small
image: the global part alone). Rows and columns come from the image processor's own
``get_number_of_image_patches`` on the header size; the text is the processor's ``replace_image_token`` string,
tokenized by the checkpoint's tokenizer (it starts and ends with a special token, so it tokenizes the same alone as
inside the prompt). The newlines are real tokens; row / column tags are the tokenizer's added tokens.

**Tensors.** ``pixel_values`` [tiles + 1, 3, S, S] per image (the processor's [1, n, 3, S, S], squeezed by the
image loader), concatenated over a batch and given to the model as one [1, all tiles, 3, S, S] row: the model flattens
its first two dimensions and places the features by the ``<image>`` tokens. Every tile is a full S x S square, so the
pixel attention mask is all ones, which the model assumes when none is given.

**Projector.** ``connector``: the pixel shuffle (no weights) that folds ``scale_factor``² patches into one token, and
one linear (``modality_projection``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..flops import VisionFlops, projector_block
from ..image_inputs import DummyImage, ImageLayout, PlannedImages
from .base import Family
from .llava import tower_blocks
from .qwen2_vl import checkpoint_image_processor, size_field

FAKE, GLOBAL, IMAGE = "<fake_token_around_image>", "<global-img>", "<image>"


def tile_tokens(config) -> int:
    """LLM tokens per tile: the tower's patches, pixel-shuffled by scale_factor."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 // config.scale_factor ** 2


@dataclass(frozen=True)
class SplitImages(ImageLayout):
    """The processor's text for an image of each size, tokenized; one [3, S, S] row per tile and the global image."""

    image_token_id: int
    image_seq_len: int
    tile: int  # max_image_size's longest edge: the tower's input side
    image_processor: object = field(compare=False, repr=False)
    tokenizer: object = field(compare=False, repr=False)
    pad: bool = False

    def text(self, rows: int, cols: int) -> str:
        """Idefics3Processor.replace_image_token for an image of rows x cols tiles (0 x 0: not split)."""
        image = IMAGE * self.image_seq_len
        split = "".join("".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
                        for r in range(rows))
        return split + ("\n" if rows else "") + f"{FAKE}{GLOBAL}{image}{FAKE}"

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        w, h = size
        if self.pad:
            w = h = max(w, h)
        _, rows, cols = self.image_processor.get_number_of_image_patches(h, w, {})
        return rows, cols

    def token_ids(self, size: tuple[int, int]) -> list[int]:
        return self.tokenizer(self.text(*self.grid(size)), add_special_tokens=False)["input_ids"]

    def tokens_in(self, tensors: dict) -> int:
        return int(tensors["pixel_values"].shape[0]) * self.image_seq_len

    def identity(self) -> dict:
        p = self.image_processor
        return {"image_token_id": self.image_token_id, "n_image_tokens": "split", "image_seq_len": self.image_seq_len,
                "tile": self.tile, "pad_to_square": self.pad, "do_image_splitting": p.do_image_splitting,
                "size": dict(p.size), "max_image_size": dict(p.max_image_size),
                "global_image_ids": self.tokenizer(self.text(0, 0), add_special_tokens=False)["input_ids"][:2]}

    def dummy(self) -> DummyImage:
        s = self.tile
        ids = self.tokenizer(self.text(0, 0), add_special_tokens=False)["input_ids"]
        # Ones, not zeros: the model drops all-zero images as batch padding (and then has no features for the tokens).
        return DummyImage(tuple(ids), {"pixel_values": torch.ones(1, 3, s, s)})

    def model_inputs(self, batch: dict) -> dict:
        out = super().model_inputs(batch)
        if "pixel_values" in out:  # the model's [rows, images, 3, S, S]: all tiles as one row's images
            out["pixel_values"] = out["pixel_values"].unsqueeze(0)
        return out


class Idefics3(Family):
    model_types = ("idefics3",)
    title = "Idefics3 (Idefics3-8B, SmolVLM-Instruct)"
    vision_attr = "vision_model"
    projector_attr = "connector"  # the connector is the projector
    trains = True

    def default_aspect(self, stage: str) -> str:
        """The processor's own resize and splitting keep the aspect ratio; padding would only add tiles."""
        return "square"

    def image_layout(self, config, processor, aspect: str) -> SplitImages:
        p, tok = processor.image_processor, processor.tokenizer
        if not hasattr(p, "get_number_of_image_patches") or not hasattr(p, "max_image_size"):
            raise ValueError(f"an idefics3 model needs its Idefics3 image processor (preprocessor_config.json), got "
                             f"{type(p).__name__}")
        v = config.vision_config
        per_tile = tile_tokens(config)
        seq = getattr(processor, "image_seq_len", per_tile)
        if seq != per_tile:
            raise ValueError(f"the processor's image_seq_len is {seq}, but a {v.image_size}-pixel tile in "
                             f"{v.patch_size}-pixel patches, pixel-shuffled by {config.scale_factor}, gives {per_tile} "
                             "tokens; fix processor_config.json")
        if p.max_image_size["longest_edge"] != v.image_size:
            raise ValueError(f"the image processor's tiles are {p.max_image_size['longest_edge']} px "
                             f"(max_image_size), the vision tower takes {v.image_size} px; fix the image processor's "
                             "max_image_size")
        missing = [t for t in (FAKE, GLOBAL, IMAGE, "<row_1_col_1>") if tok.convert_tokens_to_ids(t) in
                   (None, tok.unk_token_id)]
        if missing:
            raise ValueError(f"the tokenizer lacks Idefics3's image tokens {missing}")
        return SplitImages(config.image_token_id, per_tile, v.image_size, p, tok, pad=aspect == "pad")

    def vision_flops(self, model, parts) -> VisionFlops:
        """The SigLIP-style tower once per tile and global image (every layer feeds the connector), then the
        connector's linear on the pixel-shuffled tokens."""
        v = model.config.vision_config
        blocks, positions, patches = tower_blocks(parts.vision, v, v.num_hidden_layers)
        return VisionFlops(blocks + [projector_block(parts)], image_positions=positions,
                           image_tokens=patches // model.config.scale_factor ** 2, patches=patches)

    # The planner: each image (default: a square of the image processor's longest edge, split the most) as the global
    # image plus the tiles the image processor cuts, the tower per tile and the connector on its patches
    image_processor_class = "Idefics3ImageProcessorPil"  # its defaults, where the checkpoint has no image processor

    def planned_image_processor(self, path: str, config):
        """The checkpoint's image processor (size, max_image_size, do_image_splitting), or the class's defaults with
        tiles of the tower's side and four tiles per side without preprocessor_config.json."""
        import transformers
        tile = config.vision_config.image_size
        return checkpoint_image_processor(path, lambda: getattr(transformers, self.image_processor_class)(
            size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile}))

    def planned_size(self, config, image: PlannedImages) -> tuple[int, int]:
        side = size_field(image.image_processor.size, "longest_edge")
        return image.size or (side, side)

    def planned_grid(self, config, image: PlannedImages) -> tuple[int, int]:
        w, h = self.planned_size(config, image)
        _, rows, cols = image.image_processor.get_number_of_image_patches(h, w, {})
        return rows, cols

    def planned_tiles(self, config, image: PlannedImages) -> int:
        rows, cols = self.planned_grid(config, image)
        return rows * cols + 1

    def planned_tokens(self, config, image: PlannedImages) -> tuple[int, tuple]:
        """SplitImages.text's tokens, each tag and newline counted as one token (the tokenizer is not read)."""
        rows, cols = self.planned_grid(config, image)
        tags = 2 * rows * cols + rows + (1 if rows else 0) + 3  # <fake><row_r_col_c> per tile, \n per row, global
        return (rows * cols + 1) * tile_tokens(config) + tags, ()

    def planned_image_features(self, model, inputs: dict):
        """The tower on every tile and the connector, as get_image_features runs them on tiles that are all real
        images (its search for all-zero padding images reads values, which the meta device does not have)."""
        inner = model.model
        return inner.connector(inner.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state)

    def planned_projector_input(self, config, projector, images: int, dtype: torch.dtype,
                                image: PlannedImages) -> torch.Tensor:
        v = config.vision_config
        n = images * self.planned_tiles(config, image)
        return torch.empty(n, (v.image_size // v.patch_size) ** 2, v.hidden_size, device="meta", dtype=dtype)


FAMILY = Idefics3()
