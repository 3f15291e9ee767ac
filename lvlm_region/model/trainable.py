"""Which parameters train: a region applied to a model as requires_grad, and the per-part counts that show it."""
from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from .families import find_parts, region_modules
from .lora import adapter_parameters
from .regions import Region


def apply_region(model: PreTrainedModel, region: Region, tuner: str = "full") -> dict[str, dict[str, int]]:
    """Set requires_grad from the region and return per-part {trainable, total} parameter counts.

    ``tuner="lora"``: the region's layers train only their LoRA adapters (lora.inject put them there first);
    their base weights stay frozen. Must run before the optimizer or DeepSpeed engine exists: freezing later is
    silently ignored.
    """
    parts = find_parts(model)
    if region.num_layers != len(parts.layers):
        raise ValueError(f"region was resolved for {region.num_layers} layers, the model has {len(parts.layers)}")
    if tuner not in ("full", "lora"):
        raise ValueError(f"--tuner must be full or lora, got {tuner!r}")
    if parts.tied and region.parts["embed"] != region.parts["lm_head"]:
        raise ValueError(f"region {region.spec!r} switches embed and lm_head differently, but this model ties them "
                         "(one tensor); resolve the spec with tied=True (regions.resolve)")
    model.requires_grad_(False)
    trained = region_modules(model, region)  # index -> the layer, or its .attn / .mlp sub-layer
    for name, module in parts.named_parts().items():  # outer before inner: a nested projector is set last
        index = int(name.split(".")[1]) if name.startswith("layer.") else None
        on = index in trained if index is not None else region.parts[name]
        if on and index is not None:
            module = trained[index]
        if on and tuner == "lora" and index is not None:
            adapters = adapter_parameters(module)
            if not adapters:
                raise ValueError(f"--tuner lora: decoder {name} is in the region but has no LoRA adapter")
            for p in adapters:
                p.requires_grad_(True)
            continue
        module.requires_grad_(on)
    for p in parts.projector_extra:
        p.requires_grad_(region.parts["projector"])
    return count_parameters(model)


def count_parameters(model: PreTrainedModel) -> dict[str, dict[str, int]]:
    """Trainable / total parameter counts per part; fails if a parameter belongs to no part.

    Sizes come from ``ds_numel`` when ZeRO-3 has partitioned a parameter (its local shape is [0]).
    """
    owner = find_parts(model).owners()
    counts: dict[str, dict[str, int]] = {}
    for pname, p in model.named_parameters():
        part = owner.get(id(p))
        if part is None:
            raise ValueError(f"parameter {pname} belongs to no known part; the region cannot decide whether "
                             "it trains")
        n = getattr(p, "ds_numel", p.numel())
        c = counts.setdefault(part, {"trainable": 0, "total": 0})
        c["total"] += n
        c["trainable"] += n if p.requires_grad else 0
    counts["all"] = {"trainable": sum(c["trainable"] for c in counts.values()),
                     "total": sum(c["total"] for c in counts.values())}
    return counts


def projector_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    """The projector's parameters and those that train with it (LLaVA-NeXT's image_newline)."""
    parts = find_parts(model)
    return list(parts.projector.parameters()) + list(parts.projector_extra)


def largest_module(model: nn.Module) -> int:
    """Parameters of the largest single module (its own, not its children's): DeepSpeed's ``largest_layer_params``,
    which sizes ZeRO-3's gather buffers. ``ds_numel`` when ZeRO-3 has partitioned them."""
    return max((sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters(recurse=False)) for m in model.modules()),
               default=0)
