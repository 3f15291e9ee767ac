"""Qwen3.5 MoE (``qwen3_5_moe``, e.g. Qwen3.5-35B-A3B): Qwen3.5's layout (the projector is the merger; Gated DeltaNet
and attention layers) with a mixture-of-experts MLP in every layer: routed experts plus a gated shared expert.

As for Qwen3-VL MoE (families/qwen3_vl_moe.py): a region's layer trains whole (router, experts, shared expert),
the FLOP model counts the routed tokens' experts (``flops.RoutedExperts``) and the shared expert's linears, and the
router's load-balancing loss is added when the checkpoint's text config has ``output_router_logits`` (the planner
counts its memory: qwen3_vl_moe.RouterLoss).
"""
from .qwen3_5 import Qwen3_5
from .qwen3_vl_moe import RouterLoss


class Qwen3_5Moe(RouterLoss, Qwen3_5):
    model_types = ("qwen3_5_moe",)
    title = "Qwen3.5 MoE (e.g. Qwen3.5-35B-A3B)"


FAMILY = Qwen3_5Moe()
