"""Qwen3.5 (``qwen3_5``, the dense models): Qwen3-VL's image handling and vision tower without DeepStack, and an LLM
whose decoder layers interleave Gated DeltaNet (linear attention, ``linear_attn``) with gated self-attention
(``self_attn``; by default every fourth layer).

Images become tokens and tensors exactly as for Qwen2-VL / Qwen3-VL (``qwen2_vl.GridImages``; transformers'
processor for ``qwen3_5`` is Qwen3VLProcessor with Qwen2VLImageProcessor). **The projector is the merger**
(``visual.merger``): Qwen3.5's tower has no DeepStack mergers, so nothing else maps vision features into the LLM.

A region counts decoder layers whatever their mixer: ``uniform25`` of a 24-layer Qwen3.5 trains layers 0, 4, ...,
some of them linear-attention layers and some attention layers, each with its MLP. The FLOP model counts a linear
attention layer's causal convolution and chunked delta rule (``flops.DeltaRule``) as transformers' torch path runs
them. Packing is refused: besides the per-sample 3-D rotary positions, that torch path carries its recurrent state
across a packed row's sample boundaries (it ignores ``cu_seq_lens``). With flash-linear-attention's kernels
installed (GPU nodes) the model runs them instead; their FLOPs are the same matmuls.
"""
from .qwen2_vl import Qwen2VL


class Qwen3_5(Qwen2VL):
    model_types = ("qwen3_5",)
    title = "Qwen3.5 dense checkpoints (e.g. Qwen3.5-27B)"
    no_packing = ("computes its own 3-D rotary positions per sample (from image_grid_thw), which packed position ids "
                  "would replace, and its linear-attention layers' torch path carries their state across packed "
                  "samples")


FAMILY = Qwen3_5()
