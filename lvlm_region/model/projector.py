"""The projector's own weights: stage 1's projector.safetensors, and LLaVA / Bunny's mm_projector.bin."""
from __future__ import annotations

import logging
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from .families import find_parts

log = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"  # the projector alone, keyed as its own state_dict (linear_1.weight ...)


def projector_prefixes(model: PreTrainedModel) -> dict[str, str]:
    """The projector's own state_dict key prefix -> the model's, per module: one entry for a projector that is one
    module of the model, one per child for a projector made of several (Qwen3-VL's merger and DeepStack mergers)."""
    projector = find_parts(model).projector
    names = {id(m): n for n, m in model.named_modules()}
    if id(projector) in names:
        return {"": names[id(projector)] + "."}
    return {f"{child}.": names[id(m)] + "." for child, m in projector.named_children()}


def export_projector(model: PreTrainedModel, state_dict: dict, out_dir: str) -> None:
    """Write the projector's tensors from a full state dict to out_dir/projector.safetensors.

    transformers may rename keys when it writes model.safetensors, so stage 2 reads this file instead.
    """
    tensors = {}
    for own, theirs in projector_prefixes(model).items():
        tensors.update({own + k[len(theirs):]: v.contiguous() for k, v in state_dict.items() if k.startswith(theirs)})
    save_file(tensors, os.path.join(out_dir, PROJECTOR_FILE))


def load_projector(model: PreTrainedModel, init_dir: str) -> int:
    """Copy the projector weights of a stage-1 output directory into ``model`` (before DeepSpeed wraps it).

    Returns the number of tensors copied. Fails on missing files, missing keys or shape mismatches.
    """
    file = os.path.join(init_dir, PROJECTOR_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--init {init_dir}: no {PROJECTOR_FILE}; give the output directory of a "
                                "finished stage-1 run (launch/pretrain.py --output-dir ...)")
    own = find_parts(model).projector.state_dict()
    src = load_file(file)
    if set(src) != set(own):
        raise ValueError(f"--init {init_dir}: projector keys {sorted(src)} do not match the model's "
                         f"{sorted(own)}; was it trained from the same base model?")
    for k, t in own.items():
        if src[k].shape != t.shape:
            raise ValueError(f"--init {init_dir}: projector tensor {k} has shape {tuple(src[k].shape)}, "
                             f"the model expects {tuple(t.shape)}; was it trained from the same base model?")
    n = import_projector(model, src)
    log.info("loaded %d projector tensors from %s", n, file)
    return n


def read_mm_projector(file: str, projector: nn.Module) -> dict[str, torch.Tensor]:
    """A LLaVA / Bunny stage-1 projector file, keyed for ``projector`` (whose shapes it is checked against).

    LLaVA and Bunny save only ``mm_projector.bin``: an ``nn.Sequential`` (mlp2x_gelu: Linear, GELU, Linear) under
    ``model.mm_projector.<index>.weight|bias``. Its linears, in index order, map onto the projector's nn.Linear
    modules in order (transformers' Llava: linear_1, linear_2). ``projector`` may live on the meta device: the
    check needs shapes only, so it can run before any weights load.
    """
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--init-projector {file}: no such file; give the mm_projector.bin (or .safetensors) "
                                "of a LLaVA / Bunny stage-1 run")
    if file.endswith(".safetensors"):
        src = load_file(file)
    else:
        src = torch.load(file, map_location="cpu", weights_only=True)
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in src.items():
        head, sep, tail = key.rpartition("mm_projector.")
        index, _, kind = tail.partition(".")
        if sep and index.isdigit() and kind in ("weight", "bias"):
            found.setdefault(int(index), {})[kind] = t
    if not found:
        raise ValueError(f"--init-projector {file}: no model.mm_projector.<i>.weight keys (found {sorted(src)[:6]}); "
                         "give the mm_projector.bin that LLaVA's or Bunny's pretraining stage wrote")
    names = {id(m): n for n, m in projector.named_modules()}
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    theirs = [found[i] for i in sorted(found)]
    ours = [{"weight": m.weight, **({"bias": m.bias} if m.bias is not None else {})} for m in linears]
    their_shapes = [{k: tuple(t.shape) for k, t in e.items()} for e in theirs]
    our_shapes = [{k: tuple(t.shape) for k, t in e.items()} for e in ours]
    if their_shapes != our_shapes:
        raise ValueError(
            f"--init-projector {file}: its linears (mm_projector.{sorted(found)}) have shapes {their_shapes}, the "
            f"model's projector ({', '.join(names[id(m)] for m in linears)}) needs {our_shapes} ([out, in]); it was "
            "trained for another LLM width or vision tower, or is another projector type")
    return {f"{names[id(m)]}.{kind}": e[kind] for m, e in zip(linears, theirs) for kind in e}


def import_projector(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> int:
    """Copy projector tensors keyed as the projector's own state_dict (read_mm_projector) into ``model``."""
    own = find_parts(model).projector.state_dict()
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t.to(own[k].dtype))
    return len(tensors)
