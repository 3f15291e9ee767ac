"""The LVLM as transformers loads it: from a local checkpoint or on the meta device, its attention and its
activation checkpointing.

Everything here is plain transformers + torch; DeepSpeed is never imported (see engine.py). Parts are found by
the model's family (families/), freezing is trainable.py, the loss loss.py, the projector's files projector.py.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of every decoder / encoder layer, without input-grad hooks.

    transformers' ``activation_checkpointing_enable`` also makes the output of every input embedding require
    grad (only reentrant checkpointing needs that). With frozen parts, that sends autograd back through the
    frozen vision tower and the frozen layers below the region: work that trains nothing
    (tests/test_flops.py counts it). Non-reentrant checkpointing works with frozen layers without it.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()


def num_decoder_layers(config) -> int:
    return config.get_text_config().num_hidden_layers


ATTENTION = ("flash_attention_2", "sdpa", "eager")


def resolve_attention(requested: str, on_gpu: bool, precision: str) -> tuple[str, str | None]:
    """The attention implementation to use and, when it differs from the request, why.

    flash-attn is the optional `gpu` extra; it needs a GPU and bf16/fp16. Without them the run uses sdpa.
    """
    if requested not in ATTENTION:
        raise ValueError(f"--attn must be one of {', '.join(ATTENTION)}, got {requested!r}")
    if requested != "flash_attention_2":
        return requested, None
    if not on_gpu:
        return "sdpa", "flash_attention_2 needs a GPU; using sdpa on CPU"
    if precision not in ("bf16", "fp16"):
        return "sdpa", f"flash_attention_2 needs bf16 or fp16, not {precision}; using sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash_attention_2 asked for but flash-attn is not installed (pip install -e .[gpu]); using sdpa"
    return requested, None


def load_model(path: str, dtype: torch.dtype, attn: str = "sdpa") -> PreTrainedModel:
    """Load a transformers-format image-text-to-text checkpoint from a local directory."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model {path}: no config.json there; give a local directory written by "
                                "save_pretrained (e.g. a previous run's output directory)")
    config = AutoConfig.from_pretrained(path)
    return AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn)


def skeleton(config) -> PreTrainedModel:
    """The model a config describes, on the meta device: module structure and shapes, no memory, no weights.

    Call it before engine.PartitionedLoading exists: under it, transformers would build this inside zero.Init.
    """
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)
