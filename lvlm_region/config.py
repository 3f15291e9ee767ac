"""The one typed run configuration, shared by both stages and saved as run.json with every run.

Stages differ only in their defaults: region, data, template, length grouping, learning rate. Each field is a
``setting``: its help, and the default ``RunConfig.resolve`` applies (per stage in ``stages``, or computed as
``default_help`` says); cli.build_parser makes one flag per field from them. Fields left ``None`` are resolved by
``resolve`` before anything heavy happens.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from .infra import hub
from .model import families, schedule

# The valid values of --template and --image-aspect-ratio. The run config owns them (it is below the data layer);
# data.templates defines one template per name and data.images each aspect handling, and both check they match.
TEMPLATES = ("auto", "plain", "vicuna_v1", "llama3", "phi3", "chatml")
ASPECTS = ("pad", "square")
DEMO_DIR = "data/demo"  # relative to the working directory; created on first use
TEXT_EVAL = "text_eval.json"  # the demo's text-retention set (demo.generate writes it)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: finite, of ``kind``, between ``low`` and ``high`` (open ends where
    said). The launchers' flags parse through it and ``RunConfig.resolve`` checks with it: one rule per field."""

    kind: type  # int or float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        if self.high == math.inf:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{what} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def contains(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind is int and not isinstance(v, int)):
            return False
        return (math.isfinite(v) and (v > self.low if self.low_open else v >= self.low)
                and (v < self.high if self.high_open else v <= self.high))

    def check(self, flag: str, v) -> None:
        if v is not None and not self.contains(v):
            raise ValueError(f"{flag} must be {self.describe()}, got {v!r}")

    def parse(self, flag: str, text: str):
        """A flag's string -> value, or ValueError naming the flag and the valid range (argparse shows it)."""
        try:
            v = self.kind(text)
        except ValueError:
            raise ValueError(f"{flag} must be {self.describe()}, got {text!r}") from None
        self.check(flag, v)
        return v


POSITIVE = Range(float, 0, low_open=True)
AT_LEAST_1 = Range(int, 1)
AT_LEAST_0 = Range(int, 0)
FRACTION = Range(float, 0, 1)
# Every numeric field of RunConfig and its valid values.
RANGES = {
    "max_bad_fraction": FRACTION, "prep_workers": AT_LEAST_1, "max_steps": AT_LEAST_1, "epochs": POSITIVE,
    "lr": POSITIVE, "warmup_ratio": Range(float, 0, 1, high_open=True), "weight_decay": Range(float, 0),
    "micro_batch": AT_LEAST_1, "grad_accum": AT_LEAST_1, "grad_clip": Range(float, 0), "lora_r": AT_LEAST_1,
    "lora_alpha": Range(int, 0, low_open=True), "lora_dropout": Range(float, 0, 1, high_open=True),
    "projector_lr": POSITIVE, "max_length": AT_LEAST_1, "seed": Range(int, 0, 2 ** 32 - 1), "log_every": AT_LEAST_1,
    "num_workers": AT_LEAST_0, "eval_max_samples": AT_LEAST_0, "max_new_tokens": AT_LEAST_1,
    "save_every": AT_LEAST_0, "keep_checkpoints": AT_LEAST_0, "peak_tflops": POSITIVE,
    "dist_timeout": POSITIVE, "prep_timeout": POSITIVE, "zero": Range(int, 2, 3), "gpu_memory_gb": POSITIVE,
    "global_batch": AT_LEAST_1,
}
# RunConfig fields a resume (--resume) may change, and why that is safe: none of them changes the weights, the
# optimizer state, the data order or the schedule from the checkpoint on. Every other field is part of the run's
# identity (trainer.run_identity), so a resume that changes it is refused; tests/test_resume.py fails when a new field
# is in neither place.
RESUME_MAY_CHANGE = {
    "output_dir": "where the run writes; a checkpoint given as --resume DIR may continue elsewhere",
    "overwrite": "decides only whether an earlier run there may be replaced",
    "resume": "which checkpoint to start from",
    "eval_data": "read by the end-of-run evaluation only",
    "text_eval_data": "read by the end-of-run evaluation only",
    "eval_max_samples": "the end-of-run evaluation only",
    "max_new_tokens": "the end-of-run evaluation only",
    "on_bad_sample": "stops or not at a bad sample; the samples kept are counted in dataset_size",
    "max_bad_fraction": "stops or not before training; the samples kept are counted in dataset_size",
    "prep_workers": "how many processes prepare the data, not what they write",
    "prep_timeout": "how long ranks wait for the preparation",
    "dist_timeout": "how long a collective waits",
    "num_workers": "DataLoader processes; the sampler's order is the same",
    "log_every": "how often metrics are written",
    "save_every": "how often checkpoints are written",
    "keep_checkpoints": "how many old checkpoints are kept",
    "compare_full": "runs after training",
    "export_model": "whether the end writes the model",
    "peak_tflops": "the denominator of MFU, a reported figure",
    "grad_ckpt": "recomputes the same activations (memory, not values)",
    "plan": "the planner's choices themselves (ZeRO stage, offload, batch split) are in the identity",
    "gpu_memory_gb": "the planner's input; its choices are in the identity",
    "explicit": "which flags were typed, not their values",
    "report_to": "where the metrics are sent as well, not what they are",
    "sources": "where the starting weights were fetched from; the checkpoint holds the weights now",
}
# The fields --plan auto chooses (each one given explicitly on the command line keeps its value; see ``explicit``).
PLANNED = ("zero", "offload", "micro_batch", "grad_accum", "grad_ckpt")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


STAGES = ("pretrain", "sft")
# Peak learning rates when --lr is not given: (stage, on the demo model, tuner) -> LR. The tiny demo model learns
# from scratch-like weights, so larger steps; LoRA adapters take 10x full tuning's rate (the paper's recipe, 2e-4
# vs 2e-5).
LR_DEFAULTS = {("pretrain", False, "full"): 1e-3, ("pretrain", False, "lora"): 1e-3,
               ("sft", False, "full"): 2e-5, ("sft", False, "lora"): 2e-4,
               ("pretrain", True, "full"): 1e-2, ("pretrain", True, "lora"): 1e-2,
               ("sft", True, "full"): 2e-3, ("sft", True, "lora"): 1e-2}
# The projector's LR with --tuner lora (with full tuning it follows --lr): (on the demo model) -> LR.
LORA_PROJECTOR_LR = {False: 2e-5, True: 1e-3}


# Passes over the data when --epochs is not given: (stage, on the demo model) -> epochs. The demo's stage 1 aligns a
# projector to a tiny LLM from 2,400 captions: one pass leaves it at loss ~0.9, too weak for stage 2 to start from.
EPOCH_DEFAULTS = {("pretrain", False): 1.0, ("sft", False): 1.0, ("pretrain", True): 4.0, ("sft", True): 1.0}


def _epochs_help() -> str:
    t = EPOCH_DEFAULTS
    return (f"{t['pretrain', False]:g} for both stages; on the demo model stage 1 {t['pretrain', True]:g}, stage 2 "
            f"{t['sft', True]:g}")


def _lr_help() -> str:
    t = LR_DEFAULTS
    return (f"stage 1 {t['pretrain', False, 'full']:g}, stage 2 {t['sft', False, 'full']:g} "
            f"({t['sft', False, 'lora']:g} with --tuner lora); on the demo model stage 1 "
            f"{t['pretrain', True, 'full']:g}, stage 2 {t['sft', True, 'full']:g} "
            f"({t['sft', True, 'lora']:g} with lora)")


def _aspect_help() -> str:
    """Per stage and family, from the families' own defaults."""
    out = []
    for stage, name in (("pretrain", "stage 1"), ("sft", "stage 2")):
        by = {}
        for t in families.trainable():
            by.setdefault(families.default_aspect(stage, t), []).append(t)
        out.append(f"{name}: " + ", ".join(f"{a} ({' '.join(ts)})" for a, ts in by.items()))
    return "; ".join(out)


def setting(default=None, help: str = "", *, stages: dict | None = None, default_help: str | None = None,
            metavar: str | None = None, flag: bool = True, valid: Range | None = None, choices: tuple | None = None,
            required: bool = False, nargs: str | None = None, const=None, positional: bool = False,
            same_as: str | None = None):
    """A field of RunConfig or of a command's settings, with what its flag says: ``help``, and the default the help
    states. ``stages``: the value resolve() gives an unset field in each stage; ``default_help``: how a default is
    computed otherwise; ``valid``: the Range a number must be in (RunConfig's own are in RANGES); ``choices``,
    ``required``, ``nargs``, ``const``, ``positional``: as argparse has them. cli.add_flags makes every flag from
    these, so a flag's name, default and help are written once, here."""
    return field(default=default, metadata={"help": help, "stages": stages, "default_help": default_help,
                                            "metavar": metavar, "flag": flag, "valid": valid, "choices": choices,
                                            "required": required, "nargs": nargs, "const": const,
                                            "positional": positional, "same_as": same_as})


def same_as(name: str, stage: str = "sft", **changes):
    """A command's setting that is RunConfig's field ``name`` (its default in ``stage``, its help and valid range),
    so a tool that takes the same setting (the planner's --lora-r) cannot drift from training's. ``changes``
    override single entries (``required``, ``default_help``)."""
    f = next(f for f in dataclasses.fields(RunConfig) if f.name == name)
    meta = {**f.metadata, "stages": None, "same_as": name, "valid": RANGES.get(name), **changes}
    default = f.metadata["stages"][stage] if f.metadata.get("stages") else f.default
    return field(default=default, metadata=meta)


def default(name: str, stage: str = "sft"):
    """RunConfig field ``name``'s default in ``stage`` (for code that must start from training's defaults)."""
    return same_as(name, stage).default


LR_PARTS = ("region", "projector", "vision", "embed", "norm", "lm_head")  # --lr-groups' parts


@dataclass
class RunConfig:
    """Every setting of a run; a flag per field (cli), resolved and checked by ``resolve``, saved in run.json."""

    stage: str = setting(None, "pretrain (stage 1, projector only) or sft (stage 2, projector + region)", flag=False)
    output_dir: str = setting(None, "where the model, run.json and metrics.jsonl go")
    overwrite: bool = setting(False, "let a fresh run replace an earlier run in --output-dir (its checkpoints are "
                                     "moved to checkpoints/abandoned/, never deleted)")
    region: str | None = setting(None, "region spec: which decoder layers and parts train",
                                 stages={"pretrain": "none", "sft": "uniform25"})
    region_schedule: str | None = setting(None, "a moving region: random:K/N (K of the region's layers, drawn "
                                                "again every N optimizer steps, as LISA) | cycle:K/N (the region's "
                                                "layers in blocks of K, N steps each, as BAdam); Adam's state restarts "
                                                "at each switch", metavar="KIND:K/N")
    model: str | None = setting(None, "local transformers checkpoint dir (default: the embedded tiny demo model)")
    llm: str | None = setting(None, "causal-LM checkpoint dir (Llama, Vicuna, Mistral, Phi-3, Qwen2) to assemble "
                                    "with --vision into OUTPUT_DIR/base_model, instead of --model")
    vision: str | None = setting(None, "CLIP or SigLIP checkpoint dir (with preprocessor_config.json) for --llm")
    projector: str = setting("mlp2x_gelu", "projector of an assembled model")
    init: str | None = setting(None, "stage-1 output dir whose projector starts this run")
    init_projector: str | None = setting(None, "LLaVA / Bunny stage-1 mm_projector.bin (model.mm_projector.0/2.*) "
                                               "to start the projector from; shapes are checked before loading",
                                         metavar="FILE")
    data: str | None = setting(None, "LLaVA JSON / JSONL, messages+images JSON(L), Parquet, Arrow, a `datasets` "
                                     "dir, or a dir from data_prep/prepare.py (default: the generated demo data)")
    image_folder: str | None = setting(None, "root of the image paths of --data and --eval-data alike, in training, "
                                             "launch/evaluate.py and launch/compare.py (default: each file's own "
                                             "directory; a prepared dir: the folder it was prepared with)")
    eval_data: str | None = setting(None, "held-out data (as --data) for loss and answer accuracy at the end "
                                          "(default: the demo's held-out file when training on demo data)")
    text_eval_data: str | None = setting(None, "text-only held-out data (as --data, no images) whose answer accuracy "
                                               "at the end is the text-retention score, what stage 2 kept of the "
                                               "LLM's text skills (default: the demo's text_eval.json when training "
                                               "on demo data)")
    template: str | None = setting(None, "plain | auto (the tokenizer's own chat template) | vicuna_v1 | llama3 | "
                                         "phi3 | chatml", stages={"pretrain": "plain", "sft": "auto"})
    image_aspect_ratio: str | None = setting(None, "pad (to a square in the mean colour, as LLaVA-1.5 SFT) | square",
                                             default_help=_aspect_help())
    on_bad_sample: str = setting("skip", "skip (drop and count each) | error (stop at the first)")
    max_bad_fraction: float = setting(0.05, "stop before training when more of the samples than this are bad")
    verify_images: str = setting("decode", "decode (every image while preparing) | header (size checks only, faster)")
    allow_outside_images: bool = setting(False, "accept image paths outside --image-folder (absolute, '..', links "
                                                "leaving it); without it such samples are dropped as "
                                                "image_outside_folder, unopened")
    prep_workers: int | None = setting(None, "processes preparing the data", default_help="the CPU count")
    prep_timeout: float = setting(300.0, "seconds the other ranks wait without a heartbeat from rank 0 while it "
                                         "prepares raw data, then stop with an error")
    group_by_length: bool | None = setting(None, "batches of similar length, images and text-only apart, as "
                                                 "LLaVA's group_by_modality_length",
                                           stages={"pretrain": False, "sft": True})
    packing: bool = setting(False, "padding-free: each micro-batch's samples in one row, attention kept within "
                                   "each sample")
    zero: int = setting(2, "ZeRO stage 2 or 3 (ds_configs/zero{N}.json)")
    ds_config: str | None = setting(None, "a DeepSpeed JSON to use instead of ds_configs/zero{N}.json")
    offload: bool = setting(False, "optimizer offload: fp32 master weights, Adam state and step on the CPU "
                                   "(DeepSpeedCPUAdam), added to the ZeRO JSON")
    max_steps: int | None = setting(None, "optimizer steps (overrides --epochs)")
    epochs: float | None = setting(None, "passes over the training data when --max-steps is not given",
                                   default_help=_epochs_help())
    lr: float | None = setting(None, "peak learning rate (linear warmup, then cosine to zero)",
                               default_help=_lr_help())
    warmup_ratio: float = setting(0.03, "share of the steps spent in linear warmup")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    micro_batch: int = setting(16, "samples per rank per micro-step")
    grad_accum: int = setting(1, "micro-steps per optimizer step")
    global_batch: int | None = setting(None, "samples per optimizer step over all ranks: sets --grad-accum (or, "
                                             "with --plan auto, the split into micro-batch x accumulation)",
                                       default_help="--micro-batch x --grad-accum x ranks")
    plan: str = setting("off", "auto: the planner (launch/plan.py) picks the fastest ZeRO stage, optimizer offload, "
                               "activation checkpointing and micro-batch that fit the GPU's memory, for this model, "
                               "region, data and rank count; --zero, --offload, --grad-ckpt, --micro-batch, "
                               "--grad-accum and --ds-config given on the command line keep their values | off")
    gpu_memory_gb: float | None = setting(None, "memory per GPU (GiB) --plan auto fits the run in",
                                          default_help="the GPU's own; required on CPU")
    grad_clip: float = setting(1.0, "max global gradient norm (0: no clipping)")
    tuner: str = setting("full", "full: the region's layers train whole | lora: LoRA (peft) on every linear of the "
                                 "region's layers, projector whole")
    lora_r: int = setting(128, "LoRA rank (the paper's released recipe: r 128, alpha 256, dropout 0.05)")
    lora_alpha: int = setting(256, "LoRA alpha")
    lora_dropout: float = setting(0.05, "LoRA dropout")
    projector_lr: float | None = setting(None, "peak LR of the projector",
                                         default_help=f"--lr; with --tuner lora {LORA_PROJECTOR_LR[False]:g}, the "
                                                      f"paper's recipe ({LORA_PROJECTOR_LR[True]:g} on the demo "
                                                      "model)")
    lr_groups: str | None = setting(None, "peak LRs per part, PART=LR,... with PART one of "
                                          + ", ".join(LR_PARTS) + " (region: its decoder layers, sub-layers or "
                                          "adapters); parts not named train at --lr (the projector at "
                                          "--projector-lr); warm-up and decay shared", metavar="PART=LR,...")
    grad_ckpt: bool = setting(False, "activation checkpointing of the LLM (non-reentrant, works with frozen layers)")
    attn: str = setting("sdpa", "flash_attention_2 | sdpa | eager (flash needs a GPU, bf16/fp16 and the gpu extra; "
                                "otherwise the run says so and uses sdpa)")
    precision: str = setting("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    max_length: int = setting(2048, "token limit per sample; longer samples are dropped and counted, never cut "
                                    "through image tokens")
    seed: int = setting(0, "seed of initialisation, data order and dropout")
    log_every: int = setting(10, "optimizer steps between metrics lines")
    num_workers: int = setting(2, "DataLoader workers per rank (images are decoded there)")
    eval_max_samples: int = setting(0, "held-out samples evaluated (0: all)")
    max_new_tokens: int = setting(8, "tokens generated per held-out answer")
    save_every: int = setting(0, "optimizer steps between checkpoints in OUTPUT_DIR/checkpoints, and one at the end "
                                 "(0: none; a stop request always saves one)")
    keep_checkpoints: int = setting(2, "newest checkpoints kept (0: all)")
    resume: str | None = setting(None, "'auto': continue from the newest checkpoint in --output-dir (fresh start if "
                                       "there is none); or a checkpoint directory")
    compare_full: str | None = setting(None, "after the run, time N steps of the same job with --region full (same "
                                             "data, batch, ZeRO, checkpointing, seed) and project both arms' "
                                             "GPU-hours per epoch; or a finished full run's dir", metavar="N|DIR")
    export_model: bool = setting(True, "write the model in transformers format at the end")
    dist_timeout: float = setting(30.0, "minutes a collective may wait for the other ranks before the run fails "
                                        "(process-group timeout; DeepSpeed's default)")
    peak_tflops: float | None = setting(None, "peak TFLOP/s per GPU for MFU",
                                        default_help="bf16 data sheet by GPU name; on CPU a measured matmul")
    report_to: str = setting("none", "where the metrics go besides metrics.jsonl, comma-separated: none | tensorboard "
                                     "(OUTPUT_DIR/tensorboard) | wandb (offline into OUTPUT_DIR/wandb unless "
                                     "WANDB_MODE=online or WANDB_API_KEY is set) | csv (OUTPUT_DIR/metrics.csv); "
                                     "from rank 0, a failing tracker warns and never stops the run",
                             metavar="NAME[,NAME]")
    explicit: tuple = setting((), "the flags given on the command line (cli.parse): --plan auto leaves them as given",
                              flag=False)
    sources: dict | None = setting(None, "where --model / --llm / --vision came from: a hub id's id, revision and "
                                         "cache directory (which the field then holds), or the local path; filled "
                                         "by resolve", flag=False)

    def resolve(self, check_paths: bool = True) -> "RunConfig":
        """Fill stage defaults and validate; raises ValueError naming the field and the fix. ``check_paths``: that
        the input files and folders exist (a dry run reports the missing ones instead)."""
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 'pretrain' or 'sft', got {self.stage!r}")
        if not self.output_dir:
            raise ValueError("--output-dir is required: where the model, run.json and metrics.jsonl go")
        if (self.llm is None) != (self.vision is None):
            raise ValueError("--llm and --vision go together: give both to assemble a model from its parts")
        if self.llm is not None and self.model is not None:
            raise ValueError("--model and --llm/--vision both give the model; pass one of them")
        self.sources = dict(self.sources or {})
        for name in ("model", "llm", "vision"):  # a hub id -> its snapshot in the local cache (a dry run: configs)
            value = getattr(self, name)
            if hub.is_hub_id(value):
                setattr(self, name, hub.local_path(value, flag(name), config_only=not check_paths))
                self.sources[name] = hub.source(value, flag(name)) if check_paths else {"id": value}
            elif value is not None and name not in self.sources:
                self.sources[name] = hub.source(value)  # the local path
        demo = self.is_demo
        for f in dataclasses.fields(self):
            if f.metadata.get("stages") and getattr(self, f.name) is None:
                setattr(self, f.name, f.metadata["stages"][self.stage])
        if self.image_aspect_ratio is None:
            family = None if self.llm is not None else _model_type(self.model_path)  # --llm assembles a Llava
            self.image_aspect_ratio = families.default_aspect(self.stage, family)
        if self.template not in TEMPLATES:
            raise ValueError(f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.image_aspect_ratio not in ASPECTS:
            raise ValueError(f"--image-aspect-ratio must be one of {', '.join(ASPECTS)}, got "
                             f"{self.image_aspect_ratio!r}")
        check_options(self.on_bad_sample, self.max_bad_fraction, self.verify_images)
        if self.tuner not in ("full", "lora"):
            raise ValueError(f"--tuner must be full or lora, got {self.tuner!r}")
        if self.lr is None:
            self.lr = LR_DEFAULTS[self.stage, demo, self.tuner]
        if self.epochs is None:
            self.epochs = EPOCH_DEFAULTS[self.stage, demo]
        if self.region_schedule is not None:
            schedule.parse(self.region_schedule)  # its syntax; against the region in run_setup
        groups = self.part_lrs()  # refuses a malformed --lr-groups
        if "projector" in groups:
            if self.projector_lr is not None:
                raise ValueError(f"--lr-groups names projector={groups['projector']:g} and --projector-lr "
                                 f"{self.projector_lr:g} is given too; give the projector's LR once")
            self.projector_lr = groups["projector"]
        if self.projector_lr is None:
            self.projector_lr = LORA_PROJECTOR_LR[demo] if self.tuner == "lora" else self.lr
        for name, valid in RANGES.items():  # the flags parse through the same ranges (cli)
            valid.check(flag(name), getattr(self, name))
        if self.data is None:
            if not demo:
                raise ValueError("--data is required with --model or --llm/--vision (the demo data only fits the "
                                 "demo model)")
            self.data = os.path.join(DEMO_DIR, "pretrain.json" if self.stage == "pretrain" else "sft_train.json")
            if self.stage == "sft" and self.eval_data is None:
                self.eval_data = os.path.join(DEMO_DIR, "sft_eval.json")
            if self.stage == "sft" and self.text_eval_data is None:
                self.text_eval_data = os.path.join(DEMO_DIR, TEXT_EVAL)
        check_trackers(self.report_to)
        if self.plan not in ("off", "auto"):
            raise ValueError(f"--plan must be auto or off, got {self.plan!r}")
        if self.gpu_memory_gb is not None and self.plan != "auto":
            raise ValueError("--gpu-memory-gb is what --plan auto fits the run in; add --plan auto or drop it")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.compare_full is not None:
            if self.compare_full.isdigit():
                if int(self.compare_full) < 3:
                    raise ValueError("--compare-full N needs N >= 3 (the first steps are warm-up)")
            elif not os.path.isfile(os.path.join(self.compare_full, "run.json")):
                raise FileNotFoundError(f"--compare-full {self.compare_full}: neither a step count nor a run "
                                        f"directory with run.json")
        if self.init is not None and self.init_projector is not None:
            raise ValueError("--init and --init-projector both give the starting projector; pass one of them")
        if check_paths:
            self.check_paths()
        return self

    def check_paths(self) -> None:
        """The input folders and files the flags name exist."""
        if self.image_folder is not None and not os.path.isdir(self.image_folder):
            raise FileNotFoundError(f"--image-folder {self.image_folder} is not a directory; give the folder the "
                                    "data's image paths are relative to")
        if self.ds_config is not None and not os.path.isfile(self.ds_config):
            raise FileNotFoundError(f"--ds-config {self.ds_config} does not exist")
        if self.init is not None and not os.path.isdir(self.init):
            raise FileNotFoundError(f"--init {self.init} is not a directory; give a stage-1 output directory")
        if self.init_projector is not None and not os.path.isfile(self.init_projector):
            raise FileNotFoundError(f"--init-projector {self.init_projector}: no such file; give the mm_projector.bin "
                                    "of a LLaVA / Bunny stage-1 run")

    @property
    def is_demo(self) -> bool:
        return self.model is None and self.llm is None

    @property
    def model_path(self) -> str:
        """The transformers checkpoint the run starts from (an assembled model lives in OUTPUT_DIR/base_model)."""
        if self.llm is not None:
            return os.path.join(self.output_dir, "base_model")
        return self.model or os.path.join(DEMO_DIR, "base_model")

    def given(self, name: str) -> bool:
        """Whether field ``name`` was set by the user: on the command line, or (a config built in code) to a value
        other than its default."""
        default = next(f.default for f in dataclasses.fields(self) if f.name == name)
        return name in self.explicit or getattr(self, name) != default

    def part_lrs(self) -> dict[str, float]:
        """--lr-groups as {part: peak LR} ({} without it); ValueError naming the fault for a malformed one."""
        if not self.lr_groups:
            return {}
        out: dict[str, float] = {}
        for item in self.lr_groups.split(","):
            name, eq, value = (x.strip() for x in item.partition("="))
            if not eq or not name:
                raise ValueError(f"--lr-groups {self.lr_groups!r}: {item.strip()!r} is not PART=LR")
            if name not in LR_PARTS:
                raise ValueError(f"--lr-groups: unknown part {name!r} (valid: {', '.join(LR_PARTS)})")
            if name in out:
                raise ValueError(f"--lr-groups names {name} twice")
            try:
                lr = float(value)
            except ValueError:
                lr = float("nan")
            if not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"--lr-groups {name}={value}: the LR must be a finite number > 0")
            out[name] = lr
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TRACKERS = ("none", "tensorboard", "wandb", "csv")


def trackers(report_to: str) -> list[str]:
    """--report-to's trackers, in order, without none."""
    return [t for t in dict.fromkeys(x.strip() for x in report_to.split(",")) if t != "none"]


def check_trackers(report_to: str) -> None:
    names = [x.strip() for x in report_to.split(",")]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"--report-to {report_to!r}: unknown tracker {bad[0]!r}; give one or more of "
                         f"{', '.join(TRACKERS)}, comma-separated")
    if "none" in names and len(names) > 1:
        raise ValueError(f"--report-to {report_to!r}: none with a tracker; give none alone or the trackers")


VERIFY = ("decode", "header")  # --verify-images: decode every image, or read its header only


def check_options(on_bad_sample: str, max_bad_fraction: float, verify_images: str) -> None:
    """The bad-sample policy and image verification, checked where they are given (run config, prepare())."""
    if on_bad_sample not in ("skip", "error"):
        raise ValueError(f"--on-bad-sample must be skip or error, got {on_bad_sample!r}")
    RANGES["max_bad_fraction"].check(flag("max_bad_fraction"), max_bad_fraction)
    if verify_images not in VERIFY:
        raise ValueError(f"--verify-images must be decode or header, got {verify_images!r}")


def _model_type(model_path: str) -> str | None:
    """The model_type in a checkpoint's config.json, if there is one to read (a missing one fails later, clearly)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None
