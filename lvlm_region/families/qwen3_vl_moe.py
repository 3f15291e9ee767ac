"""Qwen3-VL MoE (``qwen3_vl_moe``: Qwen3-VL-30B-A3B, -235B-A22B): regions resolve and count; training is refused.

The layout is Qwen3-VL's (the projector is the merger and the DeepStack mergers; pruning keeps the DeepStack
layers); what is missing is the mixture-of-experts LLM in the FLOP model and the router's auxiliary loss.
"""
from .qwen3_vl import Qwen3VL


class Qwen3VLMoe(Qwen3VL):
    model_types = ("qwen3_vl_moe",)
    title = "Qwen3-VL MoE (Qwen3-VL-30B-A3B, 235B-A22B)"
    trains = False
    planned = False
    not_trainable = ("its LLM's MLPs are mixtures of experts: the FLOP model would count every expert's matmuls, "
                     "not the routed ones, and the router's load-balancing loss is not added")


FAMILY = Qwen3VLMoe()
