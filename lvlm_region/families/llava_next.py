"""LLaVA-NeXT and LLaVA-OneVision: regions resolve and count; training needs anyres tiling (image_sizes, tokens per
tile and per row)."""
from .base import Family


class LlavaNext(Family):
    model_types = ("llava_next", "llava_onevision")
    title = "LLaVA-NeXT and LLaVA-OneVision"
    projector_extra_attrs = ("image_newline",)  # trains with the projector
    not_trainable = "its images become tiles of a resolution grid (image_sizes, anyres) plus image_newline tokens"


FAMILY = LlavaNext()
