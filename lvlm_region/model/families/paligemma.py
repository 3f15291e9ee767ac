"""PaliGemma: regions resolve and count; training needs its prefix attention over image and prompt."""
from .base import Family


class PaliGemma(Family):
    model_types = ("paligemma",)
    title = "PaliGemma"
    not_trainable = "its prompt and image attend bidirectionally (token_type_ids marking the prefix)"


FAMILY = PaliGemma()
