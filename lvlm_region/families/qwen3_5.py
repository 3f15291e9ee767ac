"""Qwen3.5 (``qwen3_5``, ``qwen3_5_moe``): regions resolve and count; training is refused.

Its vision side is Qwen3-VL's without DeepStack (``visual`` / ``visual.merger``); its LLM interleaves Gated DeltaNet
(linear attention) layers with attention layers.
"""
from .base import Family


class Qwen3_5(Family):
    model_types = ("qwen3_5", "qwen3_5_moe")
    title = "Qwen3.5 (dense and MoE)"
    vision_attr = "visual"
    projector_attr = "visual.merger"
    not_trainable = ("its LLM interleaves Gated DeltaNet (linear attention) layers with attention layers, which the "
                     "FLOP model does not count yet (and the MoE variant's experts)")


FAMILY = Qwen3_5()
