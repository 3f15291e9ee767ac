"""Qwen3-VL MoE (``qwen3_vl_moe``: Qwen3-VL-30B-A3B, -235B-A22B): Qwen3-VL's layout (the projector is the merger and
the DeepStack mergers; pruning keeps the DeepStack layers) with a mixture-of-experts LLM.

A region's layer trains whole: its attention, its router (``mlp.gate``) and all its experts (``mlp.experts``, 3-D
weights). The FLOP model counts the router on every token and each token's ``num_experts_per_tok`` experts
(``flops.RoutedExperts``), whichever experts the router picks. The router's load-balancing loss is added as the
model's own loss adds it: when the checkpoint's text config has ``output_router_logits`` (weighted by
``router_aux_loss_coef``; the trainer logs it as ``router_loss``). Pruning keeps which layers have experts
(``mlp_only_layers`` / ``decoder_sparse_step`` are rewritten for the kept layers).

**The experts' layout.** The released checkpoints store ``mlp.experts.gate_up_proj`` as experts x hidden x 2 inter
and ``down_proj`` as experts x inter x hidden; transformers keeps them transposed in memory, converts on load when
a tensor's shape differs from the parameter's (``Transpose(check_dims=True)``), and its save_pretrained writes its
own layout (so does the export). Under ZeRO-3 the parameter is a partition (shape [0]), so the load always
transposes: a released checkpoint loads right, a checkpoint written by transformers 5 (this pipeline's export
included) would stop in transformers with a size mismatch after loading began; ``check_checkpoint`` refuses it
before, from the safetensors header, naming --zero 2 (which loads it).
"""
import json
import os

import torch
from safetensors import safe_open

from .qwen3_vl import Qwen3VL


class RouterLoss:
    """The planner's term for a mixture-of-experts model's load-balancing loss (Qwen3-VL MoE, Qwen3.5 MoE): with
    ``output_router_logits`` the model collects each expert layer's router logits and the loss keeps a softmax of
    them (tokens x experts) for every such layer on the backward path, also when the layer itself is checkpointed.
    The routed experts themselves need no term: the planner runs each layer, and transformers' default experts
    implementation (grouped_mm, on the GPU as on the meta device) keeps tokens x top-k rows whatever the router
    picks."""

    def planned_outside_layers(self, config, layers, on_path: list[bool], tokens: int, dtype) -> int:
        text = config.get_text_config()
        if not getattr(text, "output_router_logits", False):
            return 0
        routed = [hasattr(layer.mlp, "experts") and on for layer, on in zip(layers, on_path)]
        return sum(routed) * tokens * text.num_experts * torch.empty((), dtype=dtype).element_size()


class Qwen3VLMoe(RouterLoss, Qwen3VL):
    model_types = ("qwen3_vl_moe",)
    title = "Qwen3-VL MoE (Qwen3-VL-30B-A3B, 235B-A22B)"

    def check_checkpoint(self, path: str, config, zero: int) -> None:
        if zero != 3:
            return
        text = config.get_text_config()
        index, weight_map = os.path.join(path, "model.safetensors.index.json"), None
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        for layer in range(text.num_hidden_layers):  # the first layer with experts decides: all share a layout
            name = f"model.language_model.layers.{layer}.mlp.experts.gate_up_proj"
            file = weight_map.get(name) if weight_map is not None else "model.safetensors"
            if file is None or not os.path.isfile(os.path.join(path, file)):
                continue
            with safe_open(os.path.join(path, file), "pt") as f:
                if name not in f.keys():
                    continue
                shape = f.get_slice(name).get_shape()
            ours = [text.num_experts, 2 * text.moe_intermediate_size, text.hidden_size]
            if shape == ours and ours[1] != ours[2]:
                raise ValueError(f"--model {path} stores its experts as transformers 5 writes them ({name}: {shape}, "
                                 "experts x 2 inter x hidden), not as the released Qwen3-VL MoE checkpoints do; "
                                 "transformers' ZeRO-3 loading transposes them regardless and fails. Train or "
                                 "evaluate it with --zero 2 (or start from the released checkpoint)")
            return

FAMILY = Qwen3VLMoe()
