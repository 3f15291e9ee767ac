"""The LVLM: build the embedded tiny default, load checkpoints, find parts by module object, freeze.

Everything here is plain transformers + torch; DeepSpeed is never imported (see engine.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig,
                          LlavaConfig, LlavaForConditionalGeneration, PreTrainedModel)

from .image_inputs import FIXED_FAMILIES, GRID_FAMILIES
from .regions import Region

log = logging.getLogger(__name__)

TIED = "embed=lm_head (tied)"  # the part name of a tied input-embedding / LM-head tensor
PROJECTOR_FILE = "projector.safetensors"  # the projector alone, keyed as its own state_dict (linear_1.weight ...)


@dataclass
class Parts:
    """The model's parts as module objects; every parameter belongs to exactly one.

    ``projector_extra``: parameters that train with the projector but live on the model itself (LLaVA-NeXT's
    ``image_newline``). The projector may sit inside the vision module (Qwen2-VL's ``visual.merger``); it is
    then its own part, not the vision tower's.
    """

    vision: nn.Module
    projector: nn.Module
    embed: nn.Module
    layers: nn.ModuleList  # the LLM's decoder layers, in depth order
    norm: nn.Module
    lm_head: nn.Module
    projector_extra: tuple = ()

    def named_parts(self) -> dict[str, nn.Module]:
        """Outer parts before the parts nested in them (vision before a projector inside it)."""
        out = {"vision": self.vision, "projector": self.projector, "embed": self.embed,
               "norm": self.norm, "lm_head": self.lm_head}
        out.update({f"layer.{i}": layer for i, layer in enumerate(self.layers)})
        return out

    def owners(self) -> dict[int, str]:
        """id(parameter) -> part name; a parameter of a nested part belongs to the inner part."""
        owner: dict[int, str] = {}
        for name, module in self.named_parts().items():
            for p in module.parameters():
                owner[id(p)] = "layers" if name.startswith("layer.") else name  # later (inner) parts win
        owner.update({id(p): "projector" for p in self.projector_extra})
        if self.tied:  # one tensor, counted and logged once, under a name that says so
            owner[id(self.embed.weight)] = TIED
        return owner

    @property
    def tied(self) -> bool:
        """Whether the input embeddings and the LM head are one tensor (tie_word_embeddings)."""
        return self.lm_head is not None and getattr(self.embed, "weight", None) is getattr(self.lm_head, "weight", 1)


# Where image-text-to-text models of transformers keep the vision encoder and the projector, relative to the
# inner model (`model.model`): (vision, projector, parameters that train with the projector).
LAYOUTS = (
    # Llava, LlavaNext, LlavaOnevision, PaliGemma, Gemma3
    ("vision_tower", "multi_modal_projector", ("image_newline",)),
    ("vision_model", "connector", ()),  # Idefics3 (SmolVLM)
    ("visual", "visual.merger", ()),  # Qwen2-VL, Qwen2.5-VL: the merger is the projector
)


def _get(obj, dotted: str):
    for attr in dotted.split("."):
        obj = getattr(obj, attr, None)
    return obj


def find_parts(model: PreTrainedModel) -> Parts:
    """Locate the parts through transformers' own accessors and a registry of layouts, never name matching."""
    decoder = model.get_decoder()
    inner = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    layout = next(((v, p, x) for v, p, x in LAYOUTS
                   if isinstance(_get(inner, v), nn.Module) and isinstance(_get(inner, p), nn.Module)), None)
    if layout is None or layers is None or norm is None:
        tried = "; ".join(f"model.{v} + model.{p}" for v, p, _ in LAYOUTS)
        raise ValueError(f"{type(model).__name__} is not a recognised vision-language model: looked for a vision "
                         f"encoder and projector at {tried}, and for get_decoder().layers / .norm "
                         f"(found layers: {layers is not None}, norm: {norm is not None})")
    depth = model.config.get_text_config().num_hidden_layers
    if len(layers) != depth:
        raise ValueError(f"decoder has {len(layers)} layers but text_config.num_hidden_layers is {depth}")
    vision_attr, projector_attr, extras = layout
    extra = tuple(p for p in (getattr(inner, x, None) for x in extras) if isinstance(p, nn.Parameter))
    return Parts(vision=_get(inner, vision_attr), projector=_get(inner, projector_attr),
                 embed=model.get_input_embeddings(), layers=layers, norm=norm, lm_head=model.get_output_embeddings(),
                 projector_extra=extra)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of every decoder / encoder layer, without input-grad hooks.

    transformers' ``activation_checkpointing_enable`` also makes the output of every input embedding require
    grad (only reentrant checkpointing needs that). With frozen parts, that sends autograd back through the
    frozen vision tower and the frozen layers below the region: work that trains nothing
    (tests/test_flops.py counts it). Non-reentrant checkpointing works with frozen layers without it.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose logits the loss reads (the next label is trained).

    Passed to the model as ``logits_to_keep`` (transformers' own mechanism: a boolean [B, T] mask keeps exactly
    those positions and flattens them), so the LM head runs and logits exist only there, [N, V] instead of
    [B, T, V]: image tokens, prompts and padding (most positions of an LVLM batch) never reach the vocabulary.
    At Llama-3's 128K vocabulary, [B, T, V] in bf16 is 8.4 GB for 16 x 2048 tokens (arithmetic).
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not -100. labels [B, T]; logits [B, T, V],
    or [N, V] for the positions loss_positions(labels) kept (in its row-major order).

    Only the trained positions' logits get an fp32 copy (and fp32 gradient): casting all of [B, T, V] would cost
    4 bytes per position and vocabulary entry, most of it for image and prompt positions the loss ignores.
    """
    target = labels[:, 1:]
    keep = loss_positions(labels)[:, :-1]  # [B, T-1]
    if logits.dim() == 2:  # already only the kept positions
        return F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")  # [N, V] -> scalar


def valid_tokens(labels: torch.Tensor) -> int:
    """How many positions token_loss_sum counts."""
    return int(loss_positions(labels).sum())


def num_decoder_layers(config) -> int:
    return config.get_text_config().num_hidden_layers


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
    chosen = set(region.layers)
    for name, module in parts.named_parts().items():  # outer before inner: a nested projector is set last
        on = (int(name.split(".")[1]) in chosen) if name.startswith("layer.") else region.parts[name]
        if on and tuner == "lora" and name.startswith("layer."):
            from .lora import adapter_parameters  # lora builds on this module
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


def demo_config(vocab_size: int, image_token_id: int, pad_token_id: int) -> LlavaConfig:
    """The embedded default: an 8-layer Llama LLM, a 2-layer CLIP tower, an mlp2x_gelu projector."""
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=16, projection_dim=64)
    # Penultimate-layer patch features without CLS ("default"), as LLaVA-1.5 does.
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=(32 // 16) ** 2,
                       pad_token_id=pad_token_id)


def build_demo_model(vocab_size: int, image_token_id: int, pad_token_id: int,
                     seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(demo_config(vocab_size, image_token_id, pad_token_id))


def class_tokens(vision_config) -> int:
    """Tokens the vision tower adds before its patches: CLIP's class token; SigLIP has none."""
    return 1 if vision_config.model_type == "clip_vision_model" else 0


# Families whose training data this pipeline builds (image_inputs): Llava (a fixed number of image tokens and one
# [3, H, W] pixel tensor per image: LLaVA-1.5, Bunny, llava-hf checkpoints, models assembled with --llm/--vision) and
# Qwen2-VL / Qwen2.5-VL (a token count from each image's size, flattened patches and image_grid_thw). The others
# take more inputs (LLaVA-NeXT's image_sizes and tiling, Idefics3's image splitting, PaliGemma's prefix attention);
# their regions resolve (find_parts) but their data path is not built.
TRAINABLE_FAMILIES = FIXED_FAMILIES + GRID_FAMILIES


def check_trainable(config, where: str) -> None:
    """Refuse, before any weights or processor load, a model whose training data this pipeline cannot build."""
    if config.model_type not in TRAINABLE_FAMILIES:
        raise ValueError(
            f"{where} is a {config.model_type} model ({type(config).__name__}); training it is not supported yet: this "
            f"pipeline builds the image inputs of Llava (a fixed number of image tokens and one [3, H, W] pixel "
            f"tensor per image) and of Qwen2-VL / Qwen2.5-VL (image_grid_thw), while {config.model_type} needs its "
            f"processor's own ones (image_sizes and tiling, image splitting or prefix attention). Supported for "
            f"training: {', '.join(TRAINABLE_FAMILIES)} (LLaVA-1.5, Bunny and llava-hf checkpoints, models assembled "
            f"from an LLM and a CLIP/SigLIP tower with --llm/--vision, Qwen2-VL and Qwen2.5-VL checkpoints)")


def image_seq_length(config) -> int:
    """Image tokens per image, from the vision config and feature strategy (never a hard-coded 576/729)."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + class_tokens(v) if config.vision_feature_select_strategy == "full" else n


def make_image_processor(size: int):
    """CLIP preprocessing at ``size``; the PIL backend, since torchvision (the default backend) has no CPU
    build here and is optional on GPU nodes."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # older transformers: the PIL implementation is the default class
        from transformers import CLIPImageProcessor as cls
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


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
    import importlib.util
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


def projector_prefix(model: PreTrainedModel) -> str:
    projector = find_parts(model).projector
    return next(n for n, m in model.named_modules() if m is projector) + "."


def save_projector(model: PreTrainedModel, state_dict: dict, out_dir: str) -> None:
    """Write the projector's tensors from a full state dict to out_dir/projector.safetensors.

    transformers may rename keys when it writes model.safetensors, so stage 2 reads this file instead.
    """
    from safetensors.torch import save_file

    prefix = projector_prefix(model)
    tensors = {k[len(prefix):]: v.contiguous() for k, v in state_dict.items() if k.startswith(prefix)}
    save_file(tensors, os.path.join(out_dir, PROJECTOR_FILE))


def load_projector(model: PreTrainedModel, init_dir: str) -> int:
    """Copy the projector weights of a stage-1 output directory into ``model`` (before DeepSpeed wraps it).

    Returns the number of tensors copied. Fails on missing files, missing keys or shape mismatches.
    """
    from safetensors.torch import load_file

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
        from safetensors.torch import load_file
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
