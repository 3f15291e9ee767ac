"""Qwen3-VL (``qwen3_vl``, the dense models): Qwen2-VL's image handling with a 16-pixel patch (32 x 32 pixels per
token after the 2 x 2 merge), a SigLIP-2-style tower with learned position embeddings, and DeepStack.

Images become tokens and tensors exactly as for Qwen2-VL (``qwen2_vl.GridImages``: ``<|vision_start|>`` + k
``<|image_pad|>`` + ``<|vision_end|>``, k from the image processor's ``get_number_of_image_patches`` on the header
size; flattened patches, ``image_grid_thw`` and ``mm_token_type_ids``), which is what Qwen3VLProcessor's own
``replace_image_token`` computes from the grid.

**The projector is the merger and the DeepStack mergers.** ``visual.merger`` maps the last vision layer's patches,
merged 2 x 2, to the LLM's input embeddings at the image tokens. ``visual.deepstack_merger_list`` holds one merger
per ``vision_config.deepstack_visual_indexes`` entry: each maps an intermediate vision layer's merged patches to the
LLM's width, and the model adds the result to the hidden state at the image tokens after LLM decoder layer 0, 1, ...
(one per DeepStack merger). Both are vision-to-LLM mappings trained from scratch in Qwen3-VL's stage 1, so both are
"projector" here: stage 1 trains them together, ``-projector`` freezes them together, and stage 1's
``projector.safetensors`` carries both (``merger.*``, ``deepstack.*``).

Because the DeepStack features enter after decoder layers 0 .. k-1 by index, pruning keeps those layers
(``pinned_layers``); dropping one would move the injection to another layer.
"""
from __future__ import annotations

from torch import nn

from .qwen2_vl import Qwen2VL


class DeepStackProjector(nn.Module):
    """The projector as one module: the merger and the DeepStack mergers (the model's own module objects)."""

    def __init__(self, merger: nn.Module, deepstack: nn.ModuleList, own_input: tuple[bool, ...] = ()):
        super().__init__()
        self.merger = merger
        self.deepstack = deepstack
        self.own_input = own_input or (True,) * len(deepstack)  # a DeepStack layer's output is not the tower's

    def forward(self, patches):
        """Every merger on patches of that shape, for the memory planner's activation count: as the model feeds each
        DeepStack merger its own vision layer's output, a copy of its own, except for the last layer's (the tower's
        output, which the merger reads too)."""
        return self.merger(patches), [m(patches.clone() if own else patches)
                                      for m, own in zip(self.deepstack, self.own_input)]


class Qwen3VL(Qwen2VL):
    model_types = ("qwen3_vl",)
    title = "Qwen3-VL dense checkpoints (Qwen3-VL-2B/4B/8B/32B)"
    no_packing = ("computes its own 3-D rotary positions per sample (from image_grid_thw), which packed position ids "
                  "would replace")

    def parts(self, model, layers, norm):
        parts = super().parts(model, layers, norm)
        visual = model.model.visual
        last = len(visual.blocks) - 1
        own = tuple(i != last for i in model.config.vision_config.deepstack_visual_indexes)
        parts.projector = DeepStackProjector(visual.merger, visual.deepstack_merger_list, own)
        return parts

    def pinned_layers(self, config) -> tuple[list[int], str]:
        k = len(config.vision_config.deepstack_visual_indexes or ())
        return list(range(k)), (f"the model adds its {k} DeepStack features after decoder layers 0-{k - 1} by index"
                                if k else "")


FAMILY = Qwen3VL()
