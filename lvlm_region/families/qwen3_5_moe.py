"""Qwen3.5 MoE (``qwen3_5_moe``, e.g. Qwen3.5-35B-A3B): regions resolve and count; training is refused.

The layout is Qwen3.5's (the projector is the merger; Gated DeltaNet and attention layers); what is missing is the
mixture-of-experts LLM in the FLOP model and the router's auxiliary loss.
"""
from .qwen3_5 import Qwen3_5


class Qwen3_5Moe(Qwen3_5):
    model_types = ("qwen3_5_moe",)
    title = "Qwen3.5 MoE (e.g. Qwen3.5-35B-A3B)"
    trains = False
    not_trainable = ("its LLM's MLPs are mixtures of experts: the FLOP model would count every expert's matmuls, "
                     "not the routed ones, and the router's load-balancing loss is not added")


FAMILY = Qwen3_5Moe()
