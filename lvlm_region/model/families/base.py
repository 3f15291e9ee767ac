"""The protocol every model family implements, and the parts it locates (as module objects, never by name)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoProcessor, PreTrainedModel

from ..flops import VisionFlops
from ..image_inputs import ImageLayout, PlannedImages

TIED = "embed=lm_head (tied)"  # the part name of a tied input-embedding / LM-head tensor


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


def _get(obj, dotted: str):
    for attr in dotted.split("."):
        obj = getattr(obj, attr, None)
    return obj


class Family:
    """One model family of transformers' image-text-to-text models (one module in families/ each).

    A family that does not train (``trains = False``) still locates its parts, so regions resolve and count on
    it; its data path (image inputs, processor) is what is missing, and ``not_trainable`` says why.
    """

    model_types: tuple[str, ...] = ()  # transformers' config.model_type values this family covers
    title: str = ""  # for people: "Llava (LLaVA-1.5, Bunny, llava-hf checkpoints, ...)"
    # Where the vision encoder and the projector sit relative to the inner model (``model.model``), and the
    # parameters on the inner model that train with the projector.
    vision_attr: str = "vision_tower"
    projector_attr: str = "multi_modal_projector"
    projector_extra_attrs: tuple[str, ...] = ()
    trains: bool = False
    no_packing: str = ""  # why packed sequences (per-sample position ids) are invalid for it; "" = they are valid
    not_trainable: str = ""  # trains = False: the inputs its data path would need

    def matches(self, model: PreTrainedModel) -> bool:
        """Whether ``model`` has this family's vision encoder and projector where the family keeps them."""
        inner = getattr(model, "model", None)
        return isinstance(_get(inner, self.vision_attr), nn.Module) and isinstance(_get(inner, self.projector_attr),
                                                                                    nn.Module)

    def parts(self, model: PreTrainedModel, layers: nn.ModuleList, norm: nn.Module) -> Parts:
        inner = model.model
        extra = tuple(p for p in (getattr(inner, x, None) for x in self.projector_extra_attrs)
                      if isinstance(p, nn.Parameter))
        return Parts(vision=_get(inner, self.vision_attr), projector=_get(inner, self.projector_attr),
                     embed=model.get_input_embeddings(), layers=layers, norm=norm,
                     lm_head=model.get_output_embeddings(), projector_extra=extra)

    def default_aspect(self, stage: str) -> str:
        """--image-aspect-ratio when not given: as LLaVA-1.5, square crops for stage 1, padding for SFT."""
        return "square" if stage == "pretrain" else "pad"

    def load_processor(self, path: str):
        """The checkpoint's processor (tokenizer + image processor)."""
        return AutoProcessor.from_pretrained(path)

    def image_layout(self, config, processor, aspect: str) -> ImageLayout:
        """How this family's images become tokens and model inputs (trainable families); ``processor`` is what
        ``load_processor`` returned (its ``tokenizer`` and ``image_processor``)."""
        raise NotImplementedError(f"{self.title}: no image layout ({self.not_trainable})")

    def sublayer(self, layer: nn.Module, name: str) -> nn.Module | None:
        """A decoder layer's sub-layer for a ``.attn`` / ``.mlp`` region: its token mixer (self-attention, or a
        linear-attention mixer such as Qwen3.5's Gated DeltaNet) or its MLP (an MoE layer's router, experts and
        shared expert); None where the layer has none."""
        if name == "attn":
            return next((m for m in (getattr(layer, a, None) for a in ("self_attn", "linear_attn"))
                         if isinstance(m, nn.Module)), None)
        mlp = getattr(layer, "mlp", None)
        return mlp if name == "mlp" and isinstance(mlp, nn.Module) else None

    def pinned_layers(self, config) -> tuple[list[int], str]:
        """Decoder layers the model refers to by index (pruning keeps them), and why; none by default."""
        return [], ""

    def check_checkpoint(self, path: str, config, zero: int) -> None:
        """Refuse, before any weights load, a checkpoint this family's loading cannot read under ZeRO stage
        ``zero`` (reading only file headers); nothing to check by default."""

    def vision_flops(self, model: PreTrainedModel, parts: Parts) -> VisionFlops:
        """The vision side's blocks for the FLOP model (trainable families)."""
        raise NotImplementedError(f"{self.title}: no FLOP model of its vision side")

    # The planner (plan.Shapes): an image of a run from the model's config (and, where the family's tiles depend on
    # them, its image processor's settings), on the meta device. ``image``: image_inputs.PlannedImages.
    def planned_image_processor(self, path: str, config):
        """The image processor the planned_* methods read (``image.image_processor``): None where the config decides
        tiles and tokens (the default). A family whose tiling is an image-processor setting returns the checkpoint's
        (``path``'s preprocessor_config.json), or its class's defaults at the tower's side without one."""
        return None

    def planned_tokens(self, config, image: PlannedImages) -> tuple[int, tuple]:
        """(tokens one image becomes in the LLM, its patch grid (t, h, w) for the FLOP model: () if fixed)."""
        raise NotImplementedError(f"{self.title}: the planner does not model its images")

    def planned_tiles(self, config, image: PlannedImages) -> int:
        """What the vision tower runs on per image (the FLOP model's images): 1, or a tiled family's tiles."""
        return 1

    def planned_vision_inputs(self, config, images: int, dtype: torch.dtype, image: PlannedImages) -> dict:
        """get_image_features' keyword arguments for ``images`` images, on the meta device: by default each image's
        planned_tiles squares of the tower's input size (a family that resizes per image, or reads more than pixels,
        overrides it)."""
        side = config.vision_config.image_size
        side = side[0] if isinstance(side, (list, tuple)) else side  # InternVL's [S, S]
        n = images * self.planned_tiles(config, image)
        return {"pixel_values": torch.empty(n, 3, side, side, device="meta", dtype=dtype)}

    def planned_image_features(self, model: PreTrainedModel, inputs: dict):
        """The tower and the projector on planned_vision_inputs, as training runs them: the model's own
        get_image_features by default."""
        return model.model.get_image_features(**inputs)

    def planned_projector_input(self, config, projector: nn.Module, images: int, dtype: torch.dtype,
                                image: PlannedImages) -> torch.Tensor:
        """What ``projector`` reads for ``images`` images, on the meta device."""
        raise NotImplementedError(f"{self.title}: the planner does not model its images")

    def planned_outside_layers(self, config, layers: nn.ModuleList, on_path: list[bool], tokens: int,
                               dtype: torch.dtype) -> int:
        """Bytes the model keeps from its decoder layers beyond what each layer's own run keeps, for ``tokens``
        tokens (``on_path``: whether each layer is on the backward path): none by default."""
        return 0

    def planned_position_ids(self, config, rows: int, seq: int) -> torch.Tensor:
        """Position ids of ``rows`` samples of ``seq`` tokens as the decoder layers' rotary embedding takes them."""
        return torch.zeros((rows, seq), dtype=torch.long, device="meta")

    def planned_layer_kwargs(self, config, decoder: nn.Module, hidden: torch.Tensor,
                             position_ids: torch.Tensor) -> list[dict]:
        """Each decoder layer's keyword arguments besides its input (``hidden``): the rotary embedding, computed
        once as the decoder's forward computes it, and the positions."""
        cos_sin = decoder.rotary_emb(hidden, position_ids)
        return [{"position_embeddings": cos_sin, "position_ids": position_ids}] * len(decoder.layers)


# An LLM's config fields that describe its layers by count or by index rather than as one entry per layer. They
# belong to the text model (a Qwen2 LLM has max_window_layers inside InternVL or an assembled Llava alike), so they
# are keyed by field; per-layer lists (layer_types, ...) are cut generically by the pruner.
LAYER_FIELDS = ("max_window_layers", "mlp_only_layers", "decoder_sparse_step")


def cut_layer_fields(text_config, kept: list[int], before: dict) -> list[str]:
    """Set ``text_config``'s LAYER_FIELDS for a model that keeps only the decoder layers ``kept`` (source indices,
    in order; ``before``: the fields' values before, by name); returns the fields it changed."""
    changed = []
    if isinstance(before.get("max_window_layers"), int):  # layers below it use full attention (Qwen2)
        text_config.max_window_layers = sum(1 for i in kept if i < before["max_window_layers"])
        changed.append("max_window_layers")
    if isinstance(before.get("decoder_sparse_step"), int):  # MoE (Qwen3 MoE): which layers have experts
        dense = set(before.get("mlp_only_layers") or ())
        step = before["decoder_sparse_step"]
        text_config.mlp_only_layers = [new for new, old in enumerate(kept) if old in dense or (old + 1) % step]
        text_config.decoder_sparse_step = 1
        changed += ["mlp_only_layers", "decoder_sparse_step"]
    return changed
