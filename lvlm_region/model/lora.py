"""LoRA on the region (the paper's released recipe): peft adapters on every linear of the selected decoder layers.

The adapters are injected in place (peft's ``LoraModel``), so the model stays the transformers class it was and
``model.find_parts`` still finds every part; the base weights of the region's layers stay frozen and the
adapters (``lora_A`` / ``lora_B``) train. Targets are the full module names of the nn.Linear objects inside the
selected layers (looked up by object, never matched by pattern), so a vision layer with the same index can
never receive an adapter. Saving writes peft's adapter format and a merged transformers checkpoint, both built
by peft itself from the gathered weights.
"""
from __future__ import annotations

import copy
import logging
import os

import torch
from peft import LoraConfig, LoraModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel

from .families import region_modules
from .regions import Region

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # inside the output directory: adapter_config.json + adapter_model.safetensors


def target_modules(model: PreTrainedModel, region: Region) -> list[str]:
    """Full names of every nn.Linear inside the region's decoder layers (or their ``.attn`` / ``.mlp`` sub-layer),
    in depth order."""
    names = {id(m): n for n, m in model.named_modules()}
    targets = [names[id(m)] for module in region_modules(model, region).values() for m in module.modules()
               if isinstance(m, nn.Linear)]
    if not targets:  # the trainer refuses such a region before loading; this guards direct callers
        raise ValueError(f"--tuner lora: region {region.spec!r} selects no linear layer to put LoRA on (an MoE "
                         "MLP's experts are 3-D weights, not linears); use --tuner full, or .attn / whole layers")
    return targets


def peft_config(model: PreTrainedModel, region: Region, r: int, alpha: int, dropout: float,
                base_path: str | None = None):
    """peft's LoraConfig for the region; ``base_path`` goes into adapter_config.json as the base model."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                      target_modules=target_modules(model, region), base_model_name_or_path=base_path)


def inject(model: PreTrainedModel, config) -> None:
    """Put the adapters into ``model`` in place. peft freezes every other parameter; the caller sets the rest."""
    LoraModel(model, copy.deepcopy(config), "default")


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B weights of the adapters inside ``module``."""
    return [p for m in module.modules() if isinstance(m, LoraLayer)
            for d in (m.lora_A, m.lora_B) for p in d.parameters()]


def lora_parameter_count(config, model: PreTrainedModel) -> int:
    """What r x (in + out) over the targeted linears comes to (the analytical count, from module shapes)."""
    modules = dict(model.named_modules())
    total = 0
    for name in config.target_modules:
        m = modules[name]
        m = getattr(m, "base_layer", m)  # already injected: the wrapped linear
        total += config.r * (m.in_features + m.out_features)
    return total


def export(model: PreTrainedModel, config, state: dict, out: str) -> None:
    """Write ``out/adapter`` (peft format) and the merged model into ``out`` from a full state dict (rank 0).

    A meta-device copy of the model gets the same adapters, takes the gathered tensors by assignment (no
    second copy of the weights) and is merged by peft's own ``merge_and_unload``.
    """
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    peft_model = get_peft_model(skeleton, copy.deepcopy(config), low_cpu_mem_usage=True)
    skeleton.load_state_dict(state, assign=True, strict=True)
    peft_model.peft_config["default"].base_model_name_or_path = config.base_model_name_or_path
    peft_model.save_pretrained(os.path.join(out, ADAPTER_DIR), safe_serialization=True)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out, state_dict=merged.state_dict(), safe_serialization=True)
    log.info("saved the LoRA adapter to %s and the merged model to %s", os.path.join(out, ADAPTER_DIR), out)
