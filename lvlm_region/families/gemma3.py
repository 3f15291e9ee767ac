"""Gemma 3: regions resolve and count; training needs its wrapped soft tokens and bidirectional image attention."""
from .base import Family


class Gemma3(Family):
    model_types = ("gemma3",)
    title = "Gemma 3"
    not_trainable = ("each image is mm_tokens_per_image soft tokens wrapped in <start_of_image> / <end_of_image>, "
                     "attended bidirectionally (token_type_ids)")


FAMILY = Gemma3()
