"""The registry of model families, keyed by transformers' ``model_type``; nothing outside this package tests a
family's name or kind.

A family (``base.Family``) says where its vision tower, projector and decoder layers are, how an image becomes
tokens and model inputs, the FLOPs of its vision side, how its processor loads, its default aspect handling,
whether packing is allowed and whether it trains. docs/families.md says how to add one.
"""
from __future__ import annotations

import importlib
import pkgutil

from torch import nn
from transformers import PreTrainedModel

from ..flops import FlopModel
from .base import LAYER_FIELDS, TIED, Family, Parts, cut_layer_fields

__all__ = ["TIED", "LAYER_FIELDS", "cut_layer_fields", "Family", "Parts", "REGISTRY", "get", "find_parts",
           "family_of", "check_trainable", "trainable", "default_aspect", "flop_model", "pinned_layers",
           "region_modules"]



def _discover() -> tuple[Family, ...]:
    """Every module of this package but base defines FAMILY; adding a family is adding its module. Order: the
    families that train first, then by module name (messages list them in this order)."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
            if not isinstance(family, Family):
                raise TypeError(f"{__name__}.{info.name}.FAMILY is not a Family")
            found.append(family)
    return tuple(sorted(found, key=lambda f: not f.trains))


FAMILIES: tuple[Family, ...] = _discover()
REGISTRY: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def get(model_type: str | None) -> Family | None:
    return REGISTRY.get(model_type)


def trainable() -> list[str]:
    """The model types whose training data this pipeline builds, in registry order."""
    return [t for f in FAMILIES if f.trains for t in f.model_types]


def default_aspect(stage: str, model_type: str | None) -> str:
    """--image-aspect-ratio when not given (``model_type`` None: a Llava assembled with --llm/--vision)."""
    return (get(model_type) or REGISTRY["llava"]).default_aspect(stage)


def pinned_layers(config) -> tuple[list[int], str]:
    """Decoder layers of ``config``'s model that pruning must keep (the model refers to them by index), and why."""
    family = get(config.model_type)
    return family.pinned_layers(config) if family is not None else ([], "")


def check_trainable(config, where: str) -> Family:
    """The family of ``config``; refuses, before any weights or processor load, one this pipeline cannot train."""
    family = get(config.model_type)
    if family is not None and family.trains:
        return family
    why = family.not_trainable if family else "no family in lvlm_region/model/families/ describes its layout and inputs"
    supported = "; ".join(f.title for f in FAMILIES if f.trains)
    raise ValueError(f"{where} is a {config.model_type} model ({type(config).__name__}); training it is not supported "
                     f"yet: {why}. Supported for training: {', '.join(trainable())} ({supported})")


def family_of(model: PreTrainedModel) -> Family:
    """The registered family of ``model``; for an unregistered model_type, a family whose layout it has."""
    family = get(model.config.model_type)
    if family is not None:
        return family
    for f in FAMILIES:
        if f.matches(model):  # extras: those of every family with the same layout (image_newline ...)
            same = [g for g in FAMILIES if (g.vision_attr, g.projector_attr) == (f.vision_attr, f.projector_attr)]
            probe = Family()
            probe.vision_attr, probe.projector_attr = f.vision_attr, f.projector_attr
            probe.projector_extra_attrs = tuple(dict.fromkeys(x for g in same for x in g.projector_extra_attrs))
            return probe
    tried = "; ".join(dict.fromkeys(f"model.{f.vision_attr} + model.{f.projector_attr}" for f in FAMILIES))
    raise ValueError(f"{type(model).__name__} is not a recognised vision-language model: looked for a vision "
                     f"encoder and projector at {tried}")


def find_parts(model: PreTrainedModel) -> Parts:
    """Locate the parts through transformers' own accessors and the family's layout, never name matching."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    family = family_of(model)
    if not family.matches(model) or layers is None or norm is None:
        raise ValueError(f"{type(model).__name__} is not a recognised vision-language model: looked for a vision "
                         f"encoder and projector at model.{family.vision_attr} + model.{family.projector_attr}, and "
                         f"for get_decoder().layers / .norm (found layers: {layers is not None}, norm: "
                         f"{norm is not None})")
    depth = model.config.get_text_config().num_hidden_layers
    if len(layers) != depth:
        raise ValueError(f"decoder has {len(layers)} layers but text_config.num_hidden_layers is {depth}")
    return family.parts(model, layers, norm)


def flop_model(model: PreTrainedModel) -> FlopModel:
    """Block shapes and the current requires_grad / checkpointing of a trainable family's model (flops.py)."""
    parts = find_parts(model)
    return family_of(model).vision_flops(model, parts).with_llm(model, parts)


def region_modules(model: PreTrainedModel, region) -> dict[int, nn.Module]:
    """What trains of each of ``region``'s decoder layers (regions.Region), by index: the layer, or its ``.attn`` /
    ``.mlp`` sub-layer (``Family.sublayer``); refused, naming the layer's modules, where a layer has no such
    sub-layer."""
    layers, family = find_parts(model).layers, family_of(model)
    out = {}
    for i in region.layers:
        out[i] = family.sublayer(layers[i], region.sublayer) if region.sublayer else layers[i]
        if out[i] is None:
            has = ", ".join(n for n, _ in layers[i].named_children())
            raise ValueError(f"region {region.spec!r}: decoder layer {i} has no {region.sublayer} sub-layer (its "
                             f"modules: {has}); use a whole-layer spec or the other sub-layer")
    return out
