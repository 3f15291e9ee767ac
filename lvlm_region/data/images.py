"""Image files -> RGB -> the model's image processor, as LLaVA / Bunny prepare them.

- Modes: grayscale, palette, CMYK and the like convert to RGB through PIL; RGBA / LA / palette transparency are
  composited onto white (a plain ``convert("RGB")`` keeps whatever colour transparent pixels happen to store,
  often black); 16-bit grayscale scales 0..65535 to 0..255 (PIL's conversion would clip it to 255, white).
- ``--image-aspect-ratio pad`` (LLaVA-1.5 / Bunny SFT): pad to a square with the processor's mean colour, then
  the processor; ``square``: the processor alone (CLIP: shortest side resized, centre crop; SigLIP: resized;
  Qwen2-VL: its own resize, which keeps the aspect ratio).
- Limits checked from the header before any decoding: a side below MIN_SIDE or more than MAX_PIXELS pixels.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ..config import ASPECTS
from .formats import BadSample

MIN_SIDE = 8  # a 1x1 / 2x2 image carries nothing a vision tower can use
MAX_PIXELS = 8192 * 8192  # decoding a 20000x20000 image takes 1.2 GB per worker; LLaVA's largest are < 20 MP
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own bomb check agrees with ours


def check_aspect(aspect: str) -> None:
    if aspect not in ASPECTS:
        raise ValueError(f"--image-aspect-ratio must be one of {ASPECTS}, got {aspect!r}")


def inside_folder(folder: str, path: str, allow_outside: bool) -> str:
    """``path`` (as the data gives it) joined to ``folder``; BadSample ``image_outside_folder`` when it leaves the
    folder (absolute, ``..``, a link pointing out) and ``allow_outside`` is off. Nothing is opened: data from an
    untrusted source cannot make preparation read (and report the size of) files elsewhere on the machine."""
    joined = os.path.join(folder, path)
    if allow_outside:
        return joined
    root = os.path.realpath(folder)
    real = os.path.realpath(joined)
    if os.path.isabs(path) or not (real == root or real.startswith(root.rstrip(os.sep) + os.sep)):
        raise BadSample("image_outside_folder", f"{path!r} leaves the image folder {folder} (resolves to {real}); "
                                                "pass --allow-outside-images if the data set uses such paths")
    return joined


def check(path: str, decode: bool) -> tuple[int, int]:
    """The image's (width, height); raises BadSample if ``path`` is missing, not an image, too small or too large
    (and, with ``decode``, truncated or corrupt: only a full decode finds that)."""
    if not os.path.isfile(path):
        raise BadSample("missing_image", path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if min(w, h) < MIN_SIDE:
                raise BadSample("image_too_small", f"{path} is {w}x{h}; sides below {MIN_SIDE} px are dropped")
            if w * h > MAX_PIXELS:
                raise BadSample("image_too_large", f"{path} is {w}x{h}; more than {MAX_PIXELS} pixels are dropped")
            if decode:
                im.load()
            return w, h
    except BadSample:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses to open one more than twice MAX_PIXELS
        raise BadSample("image_too_large", f"{path}: more than {MAX_PIXELS} pixels are dropped ({e})") from None
    except DECODE_ERRORS as e:
        raise BadSample("unreadable_image", f"{path}: {type(e).__name__}: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, keeping what the pixels show (see the module docstring)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def expand_to_square(im: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: the image centred on a square canvas of ``fill``."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(im, ((side - w) // 2, (side - h) // 2))
    return canvas


class ImageLoader:
    """path -> the model's image tensors through its image processor: {pixel_values: [1, 3, H, W]} (CLIP /
    SigLIP), or what else the family reads per image (``keys``: its layout's ``tensor_keys``; see image_inputs)."""

    def __init__(self, image_processor, aspect: str, keys: tuple[str, ...] = ("pixel_values",)):
        check_aspect(aspect)
        self.processor, self.aspect, self.keys = image_processor, aspect, keys
        mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.fill = tuple(int(round(255 * m)) for m in mean)

    def rgb(self, path: str) -> Image.Image:
        """The decoded image as the image processor gets it (RGB; padded to a square with --image-aspect-ratio pad)."""
        with Image.open(path) as im:
            im.load()  # decode while the file is open (to_rgb returns an RGB image as it is)
            rgb = to_rgb(im)
        return expand_to_square(rgb, self.fill) if self.aspect == "pad" else rgb

    def __call__(self, path: str) -> dict[str, torch.Tensor]:
        out = self.processor(self.rgb(path), return_tensors="pt")
        tensors = {k: out[k] for k in self.keys if k in out}
        pixels = tensors.get("pixel_values")
        if pixels is not None and pixels.dim() == 5:  # one image's tiles as [1, tiles, 3, H, W] (LLaVA-NeXT)
            tensors["pixel_values"] = pixels[0]
        return tensors
