"""The planner (launch/plan.py): memory per GPU and step time of every ZeRO stage / offload / checkpointing /
micro-batch for a region on a GPU allocation, from the model's config alone (a meta-device skeleton, no weights).

Memory per GPU, in three parts:
- ``model_states`` (timing.model_states, the same code as a run's own logged estimate): DeepSpeed's accounting
  for bf16 mixed precision and Adam, applied per parameter: every weight in 16 bits (partitioned under ZeRO-3);
  a trainable one adds 16-bit and fp32 gradients, an fp32 master copy and Adam's two moments (18 bytes in all with
  the weight, partitioned), moved to the CPU with optimizer offload; ZeRO-3 adds the gather buffer of the largest
  module (4 bytes per parameter). For full tuning this is exactly DeepSpeed's estimate_zero{2,3}_model_states_mem_needs.
- ``activations``: what autograd keeps for the backward pass, counted by running the model's own modules on the
  meta device under ``torch.autograd.graph.saved_tensors_hooks`` with the region's requires_grad: the decoder
  layers (each trainable, frozen on the backward path, or checkpointed: then only its input, plus one layer's
  worth while it is recomputed), the projector, the final norm, and the LM head and the fp32 loss on the trained
  positions only (as the trainer runs them), and with a trainable vision tower (``+vision``) the tower and the
  projector as the model's own ``get_image_features`` runs them. Nothing below the lowest trainable parameter
  keeps anything.
  Attention is counted as flash / memory-efficient attention keeps it (q, k, v, output, log-sum-exp), what
  flash-attn and torch's sdpa keep on GPU and on CPU alike; eager attention's T x T weights are not modelled.
- ``allowance``: ALLOWANCE_GIB for the CUDA context, NCCL and DeepSpeed's communication buckets, plus
  FRAGMENTATION of the rest for the caching allocator's fragmentation (stated assumptions, not measurements).

Time: the project's FLOP model (flops.py, hardware FLOPs: recomputation included) over the epoch's micro-batches as
the run batches them (the samples' lengths, length grouping, padding or packing: epoch_flops) at one hardware
utilisation for every plan (a finished run's measured HFU, or ASSUMED_MFU, an MFU on model FLOPs of LLaVA's own
checkpointed recipe, converted by that recipe's hardware / model FLOPs), plus stated transfer terms for the gradient
reduction (hidden behind the backward pass with overlap_comm), ZeRO-3's parameter gathers and optimizer offload.
"""
from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig

from ..config import AT_LEAST_1, POSITIVE, Range, same_as, setting
from ..infra import timing
from ..model import families, regions
from ..model.families import find_parts, flop_model
from ..model.flops import BatchShape
from ..model.image_inputs import PlannedImages
from ..model.load import skeleton
from ..model.trainable import apply_region, largest_module

GIB = 2 ** 30
# Memory per GPU in GiB as torch sees it (torch.cuda.get_device_properties().total_memory: the nominal "80GB" of an
# A100 is 79.2 GiB there, not 80) and dense bf16 peak (TFLOP/s, the data sheets': timing.PEAK_TFLOPS)
GPUS = {"A100-40GB": (39.4, 312.0), "A100-80GB": (79.2, 312.0), "H100-80GB": (79.1, 989.0), "H200": (139.8, 989.0),
        "L40S": (44.4, 362.0), "A10": (22.1, 125.0)}
ALLOWANCE_GIB = 2.0  # CUDA context (~0.5-1 GiB), NCCL buffers, DeepSpeed's reduce / all-gather buckets
FRAGMENTATION = 0.10  # of model states + activations: the caching allocator's fragmentation
# MFU assumed when no run calibrates it: LLaVA-style training on transformers + DeepSpeed (this project's stack)
# reaches about 0.20-0.27 of the bf16 peak on model FLOPs in LLaVA's own recipe, with activation checkpointing
# (LLaVA-1.5-7B's published ~10 h on 8 A100s, by arithmetic); tuned stacks reach 0.5-0.6 on dense text models.
# --calibrate replaces it with the hardware utilisation a run of yours measured.
ASSUMED_MFU = 0.25
NVLINK_GBPS = 150.0  # effective all-gather / reduce-scatter bandwidth per GPU within a node (assumed)
PCIE_GBPS = 12.0  # effective host-device bandwidth per GPU (optimizer offload: gradients down, weights up)
CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeedCPUAdam updates per second per GPU's share of host cores (assumed)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
ATTENTION = "lvlm_region_planner"  # the attention function registered below (transformers' AttentionInterface)


class PlanError(ValueError):
    """A plan that cannot be made as asked, with what to change."""


class _FlashSaved(torch.autograd.Function):
    """Attention that keeps what flash / memory-efficient attention keeps for its backward: q, k, v, the output and
    the log-sum-exp per head and position, and a materialised mask when the model passes one (sdpa's
    memory-efficient kernel keeps it as its bias: Gemma 3's bidirectional image attention). Runs on the meta device
    only (shapes, no values)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):  # [B, H, T, D], k / v with their own (KV) head count; mask [B, 1, T, T] or None
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the planner only counts what the forward keeps
        raise RuntimeError("the planner's attention has no backward")


def _planner_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
    out = _FlashSaved.apply(query, key, value, mask)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _planner_attention)


def saved_bytes(run, params: list[nn.Parameter]) -> int:
    """Bytes of the distinct tensors autograd still keeps when ``run()`` returns (saved by an operation whose graph
    is alive; parameters and their views excluded: they exist anyway). A tensor saved by several operations, or
    viewed by several saved tensors, counts once."""
    own = {id(p) for p in params}
    saved: list[weakref.ref] = []

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in own and id(t) not in own:
            saved.append(weakref.ref(base))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        keep = run()  # the outputs keep their graph (and what it saved) alive until counted
    alive = {id(t): t for t in (r() for r in saved) if t is not None}
    del keep
    return sum(t.numel() * t.element_size() for t in alive.values())


@dataclass
class Setting:
    """What a plan is made for: the model, the region, the allocation and the data's shape."""

    model: str = setting(None, "a transformers checkpoint directory or hub id (its config.json is read, and the image "
                                 "processor's where a family tiles by it; no weights)",
                         required=True)
    region: str = same_as("region", default_help=None)  # stage 2's default, compared with full
    tuner: str = same_as("tuner", choices=("full", "lora"))
    lora_r: int = same_as("lora_r")
    lora_alpha: int = same_as("lora_alpha")
    lora_dropout: float = same_as("lora_dropout")
    gpus: int = setting(8, "GPUs in the allocation", valid=AT_LEAST_1)
    gpu: str = setting("A100-80GB", f"one of {', '.join(GPUS)}; another with --gpu-memory-gb and --peak-tflops")
    gpu_memory_gb: float | None = setting(None, "memory per GPU in GiB (overrides the table)", valid=POSITIVE)
    peak_tflops: float | None = setting(None, "dense bf16 peak per GPU in TFLOP/s (overrides the table)",
                                        valid=POSITIVE)
    seq_len: int = setting(2048, "tokens per sample when no --data or --lengths: every sample this long",
                           valid=AT_LEAST_1)
    fit_len: int | None = setting(None, "tokens per sample the memory must fit (default seq_len): the longest sample",
                                  flag=False)
    images: int = setting(1, "images per sample when no --data", valid=AT_LEAST_1)
    trained_fraction: float = setting(1.0, "share of positions the loss reads when no --data (1.0: an upper bound); "
                                           "the LM head runs there only", valid=Range(float, 0, 1, low_open=True))
    fit_trained_fraction: float | None = setting(None, "the same in the batch of the longest samples (memory; "
                                                       "default trained_fraction)", flag=False)
    precision: str = setting("bf16", "the bytes of weights, optimizer states and activations",
                             choices=("bf16", "fp16", "fp32"))
    samples: int = setting(665_000, "samples of one epoch (665,000: LLaVA-665K)", valid=AT_LEAST_1)
    global_batch: int = setting(128, "samples per optimizer step", valid=AT_LEAST_1)
    mfu: float = setting(ASSUMED_MFU, "model FLOPs utilisation of LLaVA-style training with checkpointing",
                         flag=False)
    mfu_source: str = setting("assumed", "where mfu comes from", flag=False)
    hfu: float | None = setting(None, "hardware FLOPs utilisation a finished run measured (--calibrate); every plan "
                                      "runs at it", flag=False)
    lengths: tuple | None = setting(None, "((length, samples), ...): the samples' lengths (--data, --lengths); none: "
                                          "every sample seq_len long", flag=False)
    group_by_length: bool = same_as("group_by_length")
    packing: bool = same_as("packing")
    overlap_comm: bool = setting(False, "DeepSpeed's overlap_comm: each micro-batch's gradient reduction overlaps its "
                                        "backward pass (the shipped ZeRO configs leave it off)")
    image_size: int | None = setting(None, "the images' side (square images): Qwen2-VL's are resized from it; the "
                                           "tiled families' tiles follow it", valid=AT_LEAST_1,
                                     default_help="with --data its images' sizes; else Qwen2-VL 448, the tiled "
                                                  "families a side that gives them the most tiles")
    data_image_sizes: tuple | None = setting(None, "(width, height) of the data's images (data_shape): the one "
                                                   "with the most tiles and tokens is planned for", flag=False)

    def length_histogram(self) -> tuple:
        """((length, samples), ...): the data's, or every sample seq_len long."""
        return self.lengths or ((self.seq_len, self.samples),)

    def mean_length(self) -> float:
        """The samples' mean length over length_histogram()."""
        lengths, counts = zip(*self.length_histogram())
        return sum(n * c for n, c in zip(lengths, counts)) / sum(counts)

    def record(self) -> dict:
        """The setting for a plan's JSON and run.json: the data's image sizes and distinct lengths as their counts
        (there may be thousands)."""
        return {**asdict(self), "data_image_sizes": len(self.data_image_sizes or ()),
                "lengths": len(self.lengths or ())}

    def memory_bytes(self) -> float:
        if self.gpu_memory_gb is not None:
            return self.gpu_memory_gb * GIB
        return GPUS[self.gpu][0] * GIB

    def peak(self) -> float:
        return (self.peak_tflops or GPUS[self.gpu][1]) * 1e12

    def memory_len(self) -> int:
        return self.fit_len or self.seq_len

    def memory_fraction(self) -> float:
        return self.trained_fraction if self.fit_trained_fraction is None else self.fit_trained_fraction


@dataclass
class Candidate:
    zero: int
    offload: bool
    grad_ckpt: bool
    micro_batch: int
    grad_accum: int
    memory_gb: dict = field(default_factory=dict)  # model_states, activations, allowance, total (GiB)
    fits: bool = False
    step_s: float = 0.0
    gpu_hours: float = 0.0
    mfu: float = 0.0  # model FLOPs / (time x GPUs x peak)
    hfu: float = 0.0  # hardware FLOPs (recomputation included) / (time x GPUs x peak)


class Shapes:
    """The model on the meta device, its parts and parameter counts, and per-region activation and FLOP figures."""

    def __init__(self, setting: Setting):
        if not os.path.isfile(os.path.join(setting.model, "config.json")):
            raise PlanError(f"--model {setting.model}: no config.json; give a transformers checkpoint directory "
                            "(only its config.json is read)")
        self.s = setting
        self.config = AutoConfig.from_pretrained(setting.model)
        self.dtype = timing.DTYPES[setting.precision]
        self.model = skeleton(self.config).to(self.dtype)
        self.model.set_attn_implementation(ATTENTION)
        self.parts = find_parts(self.model)
        self.family = families.family_of(self.model)
        self.image = self.planned_image()
        self.depth = len(self.parts.layers)
        self.total = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        self.largest = largest_module(self.model)  # the embeddings or the LM head
        self._lora: dict = {}
        self._flop_models: dict = {}
        self._flops: dict = {}
        self._batched: dict = {}

    def planned_image(self) -> PlannedImages:
        """The image planned for: --image-size's square, else of the data's image sizes the one the family makes the
        most tiles, then tokens of (memory and time alike: an upper bound), else the family's default."""
        s = self.s
        try:
            processor = self.family.planned_image_processor(s.model, self.config)
        except (OSError, ValueError) as e:
            raise PlanError(f"--model {s.model}: its image processor (preprocessor_config.json) does not load: {e}; "
                            "fix or remove the file (without it the image processor class's defaults are planned "
                            "for)") from None
        image = PlannedImages(per_sample=s.images, image_processor=processor)
        if s.image_size:
            return replace(image, size=(s.image_size, s.image_size))
        if s.data_image_sizes:
            def cost(size):
                one = replace(image, size=tuple(size))
                return self.family.planned_tiles(self.config, one), self.family.planned_tokens(self.config, one)[0]
            return replace(image, size=tuple(max(s.data_image_sizes, key=cost)))
        return image

    def region(self, spec: str):
        return regions.resolve(spec, self.depth, tied=self.parts.tied)

    def tuned(self, spec: str):
        """(model, parts, tuner) the region trains with: with --tuner lora (and a region other than full, the
        baseline), a meta skeleton with peft's adapters in the region's layers, made by peft on the meta device."""
        if self.s.tuner != "lora" or spec == "full":
            return self.model, self.parts, "full"
        if spec not in self._lora:
            from peft.tuners.lora import LoraModel

            from ..model.lora import peft_config

            model = skeleton(self.config).to(self.dtype)
            model.set_attn_implementation(ATTENTION)
            config = peft_config(model, self.region(spec), self.s.lora_r, self.s.lora_alpha, self.s.lora_dropout)
            LoraModel(model, config, "default", low_cpu_mem_usage=True)  # adapters on the meta device too
            model.to(self.dtype)  # peft makes adapters in fp32; the trainer runs them in the model's dtype
            self._lora[spec] = (model, find_parts(model), "lora")
        return self._lora[spec]

    def trainable(self, spec: str) -> int:
        model, _, tuner = self.tuned(spec)
        return apply_region(model, self.region(spec), tuner)["all"]["trainable"]

    def tokens(self) -> tuple[int, tuple]:
        """Tokens one image becomes in the LLM, and its patch grid where it varies (the family's)."""
        return self.family.planned_tokens(self.config, self.image)

    def activations(self, spec: str, grad_ckpt: bool, rows: int) -> tuple[int, int]:
        """(bytes autograd keeps for one micro-batch of ``rows`` samples, bytes of one checkpointed layer's
        activations while the backward pass recomputes it: 0 without checkpointing). See the module docstring."""
        s = self.s
        model, parts, tuner = self.tuned(spec)
        region = self.region(spec)
        apply_region(model, region, tuner)
        model.train()
        if grad_ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
        tcfg = self.config.get_text_config()
        hidden, seq = tcfg.hidden_size, s.memory_len()
        below = any(p.requires_grad for m in (parts.vision, parts.projector, parts.embed) for p in m.parameters())
        params = list(model.parameters())
        meta = dict(device="meta", dtype=self.dtype)
        total = 0
        # the projector over every image's features (what it reads needs no gradient unless the tower trains), or
        # with a trainable tower the tower and the projector, as the model's own get_image_features runs them
        feats = self.projector_input(rows)
        projector = {id(p) for p in parts.projector.parameters()}
        if any(p.requires_grad for p in parts.vision.parameters() if id(p) not in projector):
            total += saved_bytes(lambda: self.family.planned_image_features(model, self.vision_input(rows)), params)
        elif any(p.requires_grad for p in parts.projector.parameters()):
            total += saved_bytes(lambda: parts.projector(feats), params)
        # the decoder layers, bottom to top, the hidden state needing a gradient from the lowest trainable one up
        h = torch.empty(rows, seq, hidden, **meta).requires_grad_(below)
        decoder = model.get_decoder()
        position_ids = self.family.planned_position_ids(self.config, rows, seq)
        layer_kwargs = self.family.planned_layer_kwargs(self.config, decoder, h, position_ids)
        per_layer, on_path = [], []
        for i, layer in enumerate(parts.layers):
            trains = any(p.requires_grad for p in layer.parameters())
            on_path.append(h.requires_grad or trains)
            if on_path[-1]:
                x = h if h.requires_grad else h.detach().requires_grad_(False)
                out = {}
                layer_bytes = saved_bytes(lambda: out.update(y=layer(x, **layer_kwargs[i])), params)
                h = (out["y"][0] if isinstance(out["y"], tuple) else out["y"])
            else:
                layer_bytes = 0
            per_layer.append(layer_bytes)
            total += layer_bytes
        total += self.family.planned_outside_layers(self.config, parts.layers, on_path, rows * seq, self.dtype)
        recompute = 0
        if grad_ckpt and any(per_layer):  # one checkpointed layer's activations while it is recomputed
            model.activation_checkpointing_disable()
            x = torch.empty(rows, seq, hidden, **meta).requires_grad_(True)
            recompute = saved_bytes(lambda: parts.layers[self.depth - 1](x, **layer_kwargs[-1]), params)
        # final norm, then the LM head and the fp32 loss on the trained positions only
        if h.requires_grad:
            n = max(1, int(rows * seq * s.memory_fraction()))
            target = torch.empty(n, dtype=torch.long, device="meta")

            def head():
                normed = parts.norm(h)
                logits = parts.lm_head(normed.reshape(-1, hidden)[:n])
                return torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
            total += saved_bytes(head, params)
        model.activation_checkpointing_disable()
        return total, recompute

    def vision_input(self, rows: int) -> dict:
        """get_image_features' inputs for ``rows`` samples' images on the meta device."""
        return self.family.planned_vision_inputs(self.config, rows * self.s.images, self.dtype, self.image)

    def projector_input(self, rows: int):
        """The projector's input for ``rows`` samples' images, on the meta device."""
        return self.family.planned_projector_input(self.config, self.parts.projector, rows * self.s.images,
                                                   self.dtype, self.image)

    def flop_model(self, spec: str, grad_ckpt: bool):
        """The FLOP model of the model with the region applied (its requires_grad: whole layers, a sub-layer, or
        LoRA's adapters, whose own matmuls train), with the checkpointing asked for."""
        key = (spec, grad_ckpt)
        if key not in self._flop_models:
            model, _, tuner = self.tuned(spec)
            apply_region(model, self.region(spec), tuner)
            fm = flop_model(model)
            self._flop_models[key] = replace(fm, blocks=[replace(b, checkpointed=grad_ckpt) if b.kind == "llm" else b
                                                         for b in fm.blocks])
        return self._flop_models[key]

    def flops(self, spec: str, grad_ckpt: bool, rows: int, seq: int):
        """flops.Flops of one micro-batch of ``rows`` samples padded to ``seq`` tokens, each with the setting's
        images (cached); the LM head runs on the trained share of its positions (padding counted: an upper bound)."""
        key = (spec, grad_ckpt, rows, seq)
        if key not in self._flops:
            _, grids = self.tokens()
            per_sample = self.s.images
            tower = rows * per_sample * self.family.planned_tiles(self.config, self.image)
            shape = BatchShape(rows=rows, seq_len=seq, images=tower, grids=grids * rows * per_sample,
                               head_tokens=max(1, int(rows * seq * self.s.trained_fraction)))
            self._flops[key] = self.flop_model(spec, grad_ckpt).micro_batch(shape)
        return self._flops[key]

    def batched(self, micro_batch: int):
        """micro_steps() of the setting, once per micro-batch size."""
        if micro_batch not in self._batched:
            self._batched[micro_batch] = micro_steps(self.s, micro_batch)
        return self._batched[micro_batch]

    def hfu(self) -> float:
        """The hardware utilisation every plan runs at: a run's measured one (--calibrate), else the assumed MFU
        (LLaVA-style runs' on model FLOPs, with checkpointing) times the hardware / model FLOPs of LLaVA's own recipe
        (full tuning, activation checkpointing) on one sample of the setting's mean length."""
        if self.s.hfu:
            return self.s.hfu
        f = self.flops("full", True, 1, max(1, round(self.s.mean_length())))
        return self.s.mfu * f.hardware / f.model


SIMULATED = 65_536  # samples whose batching the step time simulates (drawn from the length histogram; scaled up)


def micro_steps(setting: Setting, micro_batch: int):
    """The samples' lengths as the run would batch them: an array [micro-steps, ranks, micro_batch] (0 where a rank's
    micro-batch has fewer samples), over up to SIMULATED samples drawn with a fixed seed from the length histogram,
    ordered as the trainer's sampler orders them (--group-by-length: data.batches.grouped_order, one modality; else
    a seeded shuffle), whole global micro-steps only (as grouped_order drops the rest)."""
    import numpy as np

    from ..data.batches import grouped_order

    lengths, counts = (np.array(x) for x in zip(*setting.length_histogram()))
    n = int(counts.sum())
    rng = np.random.default_rng(0)
    if n > SIMULATED:
        drawn = rng.choice(lengths, size=SIMULATED, p=counts / n)
    else:
        drawn = np.repeat(lengths, counts)
    size = micro_batch * setting.gpus
    if setting.group_by_length:
        order = [i for batch in grouped_order(drawn.tolist(), [True] * len(drawn), micro_batch, setting.gpus,
                                              torch.Generator().manual_seed(0)) for i in batch]
        drawn = drawn[order]
    else:
        drawn = drawn[rng.permutation(len(drawn))]
    whole = len(drawn) - len(drawn) % size
    if whole == 0:  # fewer samples than one global micro-step: one padded with empty slots
        drawn, whole = np.concatenate([drawn, np.zeros(size - len(drawn), dtype=drawn.dtype)]), size
    return drawn[:whole].reshape(-1, setting.gpus, micro_batch)


def epoch_flops(shapes: Shapes, spec: str, grad_ckpt: bool, micro_batch: int) -> dict:
    """Over micro_steps(): ``slowest``, the sum over micro-steps of the slowest rank's hardware FLOPs (ranks wait for
    each other at every gradient reduction), ``hardware`` and ``model``, all ranks' FLOPs, and ``backward``, the
    slowest rank's backward FLOPs per micro-step on average; all scaled from the simulated samples to the epoch's.
    Padded micro-batches run at their longest sample; packed ones (--packing) are each sample's own length."""
    import numpy as np

    s = shapes.s
    steps = shapes.batched(micro_batch)

    def cost(rows: int, seq: int):
        f = shapes.flops(spec, grad_ckpt, rows, seq)  # cached by shape
        return f.hardware, f.model, f.act_grad + f.weight_grad

    if s.packing:  # one row of the micro-batch's samples: each sample's own work
        per = np.vectorize(lambda n: cost(1, int(n)) if n else (0.0, 0.0, 0.0), otypes=[float] * 3)(steps)
        work = [x.sum(axis=2) for x in per]  # [micro-steps, ranks] each
    else:
        longest = steps.max(axis=2)
        rows = (steps > 0).sum(axis=2)
        work = list(np.vectorize(lambda r, n: cost(int(r), int(n)) if n else (0.0, 0.0, 0.0),
                                 otypes=[float] * 3)(rows, longest))
    hardware, model, backward = work
    slowest = hardware.argmax(axis=1)
    scale = s.samples / steps.astype(bool).sum()  # the simulated samples stand for the epoch's
    picked = np.take_along_axis(backward, slowest[:, None], axis=1)
    return {"slowest": float(hardware.max(axis=1).sum() * scale), "hardware": float(hardware.sum() * scale),
            "model": float(model.sum() * scale), "micro_steps": len(steps) * scale,
            "backward": float(picked.mean())}


def candidates(shapes: Shapes, spec: str) -> list[Candidate]:
    """Every ZeRO stage x offload x checkpointing x micro-batch whose accumulation fills the global batch.

    Time: the epoch's micro-batches as the run batches them (epoch_flops) at the hardware utilisation ``hfu``
    (a run's measured one with --calibrate; else the assumed MFU, which is LLaVA-style runs' on model FLOPs with
    checkpointing, times that recipe's hardware / model FLOPs: recomputation is extra time), plus the transfer
    terms of each optimizer step; MFU and HFU of the plan beside."""
    s = shapes.s
    trainable = shapes.trainable(spec)
    out = []
    act = {(ck, mb): shapes.activations(spec, ck, mb) for ck in (False, True) for mb in (1, 2)}
    rate = s.peak() * shapes.hfu()
    work = {(ck, mb): epoch_flops(shapes, spec, ck, mb) for ck in (False, True) for mb in MICRO_BATCHES
            if s.global_batch % (mb * s.gpus) == 0}
    for zero in (2, 3):
        for offload in (False, True):
            states = timing.model_states(shapes.total, trainable, zero, s.gpus, s.precision, offload,
                                         largest=shapes.largest)["total_on_device"]
            for ck in (False, True):
                # both grow linearly with the micro-batch: a + b x micro-batch from micro-batches 1 and 2
                per_row = [two - one for one, two in zip(act[(ck, 1)], act[(ck, 2)])]
                fixed = [one - b for one, b in zip(act[(ck, 1)], per_row)]
                for mb in MICRO_BATCHES:
                    if (ck, mb) not in work:
                        continue
                    w = work[(ck, mb)]
                    accum = s.global_batch // (mb * s.gpus)
                    acts, recompute = (a + b * mb for a, b in zip(fixed, per_row))
                    allowance = ALLOWANCE_GIB * GIB + FRAGMENTATION * (states + acts + recompute)
                    total = states + acts + recompute + allowance
                    steps = w["micro_steps"] / accum
                    transfer = transfer_seconds(shapes.total, trainable, zero, offload, accum, s.gpus,
                                                hidden=w["backward"] / rate if s.overlap_comm else 0.0)
                    epoch = w["slowest"] / rate + transfer * steps
                    out.append(Candidate(zero, offload, ck, mb, accum,
                                         {"model_states": states / GIB, "activations": acts / GIB,
                                          "recompute": recompute / GIB, "allowance": allowance / GIB,
                                          "total": total / GIB},
                                         total <= s.memory_bytes(), epoch / steps, epoch * s.gpus / 3600,
                                         w["model"] / (epoch * s.gpus * s.peak()),
                                         w["hardware"] / (epoch * s.gpus * s.peak())))
    return out


def transfer_seconds(total: int, trainable: int, zero: int, offload: bool, accum: int, gpus: int,
                     hidden: float = 0.0) -> float:
    """Stated transfer terms of a step (bandwidths above are assumptions): every micro-batch reduce-scatters the
    trainable parameters' 16-bit gradients (ZeRO-2 and 3 keep only their partition; with overlap_comm up to
    ``hidden`` seconds of it, the micro-batch's backward, run meanwhile) and, under ZeRO-3, gathers every
    16-bit weight twice (forward and backward); offload moves the trainable gradients down and weights up and runs
    Adam on the CPU, once a step."""
    t = 0.0
    if gpus > 1:
        share = (gpus - 1) / gpus
        t += accum * max(0.0, 2 * trainable * share / (NVLINK_GBPS * 1e9) - hidden)
        if zero == 3:
            t += accum * 2 * 2 * total * share / (NVLINK_GBPS * 1e9)
    if offload:
        part = trainable / gpus
        t += part * (2 + 2) / (PCIE_GBPS * 1e9) + part / CPU_ADAM_PARAMS_PER_S
    return t


def best(cands: list[Candidate]) -> Candidate | None:
    """The fastest candidate that fits. Ties (the FLOP model at one MFU cannot tell them apart: one GPU, where no
    transfer term differs) go to the simpler and, on a real GPU, faster setup: ZeRO-2, no offload, no
    checkpointing, then the larger micro-batch (fewer, fuller kernels), then the least memory."""
    fitting = [c for c in cands if c.fits]
    return min(fitting, key=lambda c: (round(c.step_s, 9), c.zero, c.offload, c.grad_ckpt, -c.micro_batch,
                                       c.memory_gb["total"])) if fitting else None


def calibrated(run_dir: str) -> tuple[float, float]:
    """(MFU, HFU) a finished run measured (run.json's timing); the planner runs every plan at the HFU (its hardware
    rate, which does not depend on checkpointing) and reports the MFU beside."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise PlanError(f"--calibrate {run_dir}: no run.json there; give a finished run's output directory")
    with open(path) as f:
        timing_ = json.load(f).get("timing") or {}
    got = [timing_.get(k) for k in ("mfu", "hfu")]
    if not all(x and math.isfinite(x) and x > 0 for x in got):
        raise PlanError(f"--calibrate {run_dir}: its run.json has no measured MFU and HFU (an unfinished or failed "
                        "run?)")
    return float(got[0]), float(got[1])


def plan(setting: Setting) -> dict:
    """Candidates for the region and for full tuning, the best of each and the ratio of their GPU-hours."""
    if setting.gpu not in GPUS and (setting.gpu_memory_gb is None or setting.peak_tflops is None):
        raise PlanError(f"--gpu {setting.gpu!r} is not in the table ({', '.join(GPUS)}); give --gpu-memory-gb and "
                        "--peak-tflops for another GPU")
    if setting.gpus < 1 or setting.global_batch < setting.gpus or setting.global_batch % setting.gpus:
        raise PlanError(f"--global-batch {setting.global_batch} must be a positive multiple of --gpus {setting.gpus}")
    shapes = _shapes(setting)
    mine, full = candidates(shapes, setting.region), candidates(shapes, "full")
    b, fb = best(mine), best(full)
    described = {**setting.record(), "memory_gib": setting.memory_bytes() / GIB, "peak_tflops": setting.peak() / 1e12,
                 "planned_image_size": shapes.image.size, "planned_hfu": shapes.hfu(),
                 "mean_length": setting.mean_length()}
    return {"setting": described, "parameters": {"total": shapes.total,
                                                       "trainable": shapes.trainable(setting.region),
                                                       "trainable_full": shapes.trainable("full")},
            "candidates": [asdict(c) for c in mine], "full_candidates": [asdict(c) for c in full],
            "best": b and asdict(b), "full_best": fb and asdict(fb),
            "gpu_hours_ratio": b.gpu_hours / fb.gpu_hours if b and fb else None}


def _shapes(setting: Setting) -> Shapes:
    shapes = Shapes(setting)
    try:
        shapes.region(setting.region)
    except ValueError as e:
        raise PlanError(f"--region: {e}") from None
    return shapes


def choose(setting: Setting, fixed: dict, moving: bool = False) -> tuple[Candidate | None, list[Candidate]]:
    """For a run's --plan auto: the fastest fitting candidate of the region among those that agree with ``fixed``
    (Candidate field -> value: what the user set), and those candidates. ``moving`` (--region-schedule): without
    ZeRO-3 with activation checkpointing, which a moving region cannot run (run_setup.MOVING_ZERO3_CKPT)."""
    if setting.gpus < 1 or setting.global_batch % setting.gpus:
        raise PlanError(f"the global batch {setting.global_batch} is not a multiple of the {setting.gpus} ranks; set "
                        "--global-batch (or --micro-batch x --grad-accum) to a multiple of the rank count")
    cands = [c for c in candidates(_shapes(setting), setting.region)
             if all(getattr(c, k) == v for k, v in fixed.items()) and not (moving and c.zero == 3 and c.grad_ckpt)]
    return best(cands), cands


def no_candidate(setting: Setting, fixed: dict, flags: list[str]) -> str:
    """Why no candidate agrees with ``fixed`` (the values the user set): the first one that no candidate has, with
    the values the planner does try."""
    names = {"zero": "--zero", "offload": "--offload", "grad_ckpt": "--grad-ckpt", "micro_batch": "--micro-batch",
             "grad_accum": "--grad-accum"}
    batches = [mb for mb in MICRO_BATCHES if setting.global_batch % (mb * setting.gpus) == 0]
    tried = {"zero": [2, 3], "offload": [False, True], "grad_ckpt": [False, True], "micro_batch": batches,
             "grad_accum": [setting.global_batch // (mb * setting.gpus) for mb in batches]}
    for key, value in fixed.items():
        if value not in tried[key]:
            shown = ", ".join(map(str, tried[key])) or "none"
            return (f"{names[key]} {value} is not one of the values the planner tries for global batch "
                    f"{setting.global_batch} on {setting.gpus} rank(s) ({shown}: micro-batches of "
                    f"{', '.join(map(str, MICRO_BATCHES))} that divide it); give one of them, or drop {names[key]}")
    return (f"no candidate has all of {', '.join(f'{names[k]} {v}' for k, v in fixed.items())} together (the flags "
            f"given: {', '.join(flags)}); drop one of them")


def data_shape(ds, sample: int = 10_000, image_folder: str | None = None) -> dict:
    """The shape a prepared data set gives a plan: ``lengths``, every sample's length (the step time batches them as
    the run does); ``seq_len``, the 95th-percentile sample length (shown); ``fit_len``, the longest sample (a
    length-grouped micro-batch of the longest samples must fit); ``trained_fraction``, the share of positions whose
    label trains (the step time); ``fit_trained_fraction``, that share among the longest samples, as many as the
    largest micro-batch (length grouping batches them together, and the LM head's memory must fit that batch);
    ``images``, the most images one sample has (at least 1: a text-only batch carries a dummy image); with
    ``image_folder``, ``data_image_sizes``: the distinct sizes of the images (read_image_sizes()). Labels and
    images are read over up to ``sample`` samples drawn with a fixed seed: reading every label of 665K samples
    would take minutes."""
    import random

    all_lengths = ds["length"]
    lengths = sorted(all_lengths)
    longest = sorted(range(len(ds)), key=lambda i: -all_lengths[i])[:MICRO_BATCHES[-1]]
    if len(ds) > sample:
        ds_sample = ds.select(sorted(random.Random(0).sample(range(len(ds)), sample)))
    else:
        ds_sample = ds
    paths = ds_sample["images"]
    shape = {"seq_len": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], "fit_len": lengths[-1],
             "lengths": histogram(all_lengths),
             "trained_fraction": trained_fraction(ds_sample["labels"]),
             "fit_trained_fraction": trained_fraction(ds.select(longest)["labels"]),
             "images": max(1, max(len(x) for x in paths))}
    if image_folder is not None:
        shape["data_image_sizes"] = read_image_sizes(paths, image_folder)
    return shape


def read_image_sizes(paths: list[list[str]], folder: str) -> tuple | None:
    """The distinct (width, height) of the samples' images under ``folder``, from the files' headers (no pixels are
    decoded); a file that does not open is left out (preparation checked them all; a plan is an estimate). None
    without images."""
    from PIL import Image

    sizes = set()
    for path in {p for row in paths for p in row}:
        try:
            with Image.open(os.path.join(folder, path)) as im:
                sizes.add(im.size)
        except OSError:
            continue
    return tuple(sorted(sizes)) or None


def histogram(lengths) -> tuple:
    """((length, samples), ...) in increasing length."""
    from collections import Counter
    return tuple(sorted(Counter(int(n) for n in lengths).items()))


def read_lengths(path: str) -> dict:
    """--lengths FILE: a JSON object {length: samples} or lines 'length samples' (# comments); the setting's
    ``lengths`` and ``fit_len`` (the longest: memory). Refused with the line at fault."""
    if not os.path.isfile(path):
        raise PlanError(f"--lengths {path}: no such file")
    with open(path) as f:
        text = f.read()
    pairs = []
    if text.lstrip().startswith("{"):
        try:
            pairs = [(k, v) for k, v in json.loads(text).items()]
        except json.JSONDecodeError as e:
            raise PlanError(f"--lengths {path}: not valid JSON ({e})") from None
    else:
        for no, line in enumerate(text.splitlines(), 1):
            line = line.split("#")[0].strip()
            if line:
                parts = line.replace(",", " ").split()
                if len(parts) != 2:
                    raise PlanError(f"--lengths {path} line {no}: {line!r} is not 'length samples'")
                pairs.append(tuple(parts))
    out = {}
    for k, v in pairs:
        try:
            length, count = int(k), int(v)
        except (TypeError, ValueError):
            raise PlanError(f"--lengths {path}: {k!r}: {v!r} is not a whole length and sample count") from None
        if length < 1 or count < 0:
            raise PlanError(f"--lengths {path}: length {length} with {count} samples; lengths must be >= 1 and "
                            "counts >= 0")
        out[length] = out.get(length, 0) + count
    out = {n: c for n, c in out.items() if c}
    if not out:
        raise PlanError(f"--lengths {path}: no samples in it")
    return {"lengths": tuple(sorted(out.items())), "fit_len": max(out)}


def trained_fraction(labels: list[list[int]]) -> float:
    """The share of positions whose label trains."""
    return sum(sum(1 for x in row if x != -100) for row in labels) / max(1, sum(len(row) for row in labels))


def from_prepared(path: str, sample: int = 10_000) -> dict:
    """data_shape of a prepared data directory (launch/plan.py --data)."""
    from ..data.prepare import is_prepared, load_prepared

    if not is_prepared(path):
        raise PlanError(f"--data {path} is not a prepared directory (data_prep/prepare.py writes one); or give "
                        "--seq-len")
    ds, meta = load_prepared(path)
    return data_shape(ds, sample, meta["identity"]["image_folder"])


def row(name: str, c: dict) -> str:
    """One candidate (asdict of a Candidate) as a row of table()."""
    m = c["memory_gb"]
    return (f"| {name} | {c['zero']} | {'yes' if c['offload'] else 'no'} | {'yes' if c['grad_ckpt'] else 'no'} | "
            f"{c['micro_batch']} | {c['grad_accum']} | {m['model_states']:.1f} | "
            f"{m['activations'] + m['recompute']:.1f} | {m['total']:.1f} | {'yes' if c['fits'] else 'no'} | "
            f"{c['step_s']:.2f} | {c['gpu_hours']:.1f} |")


HEADER = ("| region | zero | offload | grad ckpt | micro-batch | accum | states GiB | activations GiB | total GiB "
          "| fits | step s | GPU-hours |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def table(out: dict) -> str:
    """For the region and for full tuning: the fastest fitting micro-batch of each ZeRO / offload / checkpointing
    combination, then the two bests and their GPU-hours ratio."""
    s = out["setting"]
    longest = f"(memory for the longest, {s['fit_len']}) " if s.get("fit_len") else ""
    tokens = (f"{s['lengths']} distinct lengths, {s['mean_length']:.0f} tokens on average" if s["lengths"] else
              f"{s['seq_len']} tokens each")
    batching = ("packed" if s["packing"] else "padded") + (", length-grouped" if s["group_by_length"] else "")
    rate = (f"HFU {s['hfu']:.3f} ({s['mfu_source']})" if s["hfu"] else
            f"MFU {s['mfu']:.2f} of a checkpointed run ({s['mfu_source']}): HFU {s['planned_hfu']:.3f}")
    lines = [f"{s['gpus']} x {s['gpu']} ({s['memory_gib']:.0f} GiB, {s['peak_tflops']:.0f} TFLOP/s bf16), "
             f"{s['samples']:,} samples, global batch {s['global_batch']}, {tokens} {longest}"
             f"(trained fraction {s['trained_fraction']:.2f}), {batching}, {rate}"]
    if s.get("planned_image_size"):
        w, h = s["planned_image_size"]
        lines.append(f"images: {s['images']} per sample of {w}x{h} px"
                     + (f" (of the data's {s['data_image_sizes']} sizes, the most tiles and tokens)"
                        if s["data_image_sizes"] and not s["image_size"] else ""))
    lines += ["", HEADER]
    for name, key in ((s["region"], "candidates"), ("full", "full_candidates")):
        groups: dict = {}
        for c in out[key]:
            groups.setdefault((c["zero"], c["offload"], c["grad_ckpt"]), []).append(c)
        for combo, cs in groups.items():
            fitting = [c for c in cs if c["fits"]]
            c = min(fitting, key=lambda c: c["step_s"]) if fitting else min(cs, key=lambda c: c["memory_gb"]["total"])
            lines.append(row(name, c))
    lines.append("")
    for label, key in (("best", "best"), ("best full", "full_best")):
        c = out[key]
        lines.append(f"{label}: " + ("nothing fits" if c is None else
                                     f"ZeRO-{c['zero']}, offload {'on' if c['offload'] else 'off'}, checkpointing "
                                     f"{'on' if c['grad_ckpt'] else 'off'}, micro-batch {c['micro_batch']} x "
                                     f"accumulation {c['grad_accum']}: {c['memory_gb']['total']:.1f} GiB, "
                                     f"{c['step_s']:.2f} s/step, {c['gpu_hours']:.1f} GPU-hours, MFU "
                                     f"{c['mfu']:.3f} (HFU {c['hfu']:.3f})"))
    if out["gpu_hours_ratio"] is not None:
        lines.append(f"gpu_hours_ratio (best / best full): {out['gpu_hours_ratio']:.3f}")
    return "\n".join(lines) + "\n"
