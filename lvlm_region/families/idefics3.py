"""Idefics3 (SmolVLM): regions resolve and count; training needs its image splitting."""
from .base import Family


class Idefics3(Family):
    model_types = ("idefics3",)
    title = "Idefics3 (SmolVLM)"
    vision_attr = "vision_model"
    projector_attr = "connector"  # the connector is the projector
    not_trainable = "its images are split into tiles plus a global image, each with its own row / column tokens"


FAMILY = Idefics3()
