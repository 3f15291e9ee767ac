"""LLaVA-OneVision (``llava_onevision``): regions resolve and count; training is refused.

Its layout is LLaVA-NeXT's (``image_newline`` trains with the projector); what is not built is its data path: an image
of a multi-image sample is not tiled (the model reads ``batch_num_images``), and a large image's features are
interpolated down to at most 9 tiles' worth (``anyres_max_9``), which the token count must follow.
"""
from .base import Family


class LlavaOnevision(Family):
    model_types = ("llava_onevision",)
    title = "LLaVA-OneVision"
    projector_extra_attrs = ("image_newline",)  # trains with the projector
    not_trainable = ("its token counts depend on the sample (multi-image samples are not tiled: batch_num_images) "
                     "and large images' features are interpolated down (anyres_max_9); not built yet")


FAMILY = LlavaOnevision()
