"""The one typed run configuration, shared by both stages and saved as run.json with every run.

Stages differ only in their defaults (``stage_defaults``): region, data, template, learning rate, ZeRO stage.
Fields left ``None`` are resolved by ``RunConfig.resolve`` before anything heavy happens.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

DEMO_DIR = "data/demo"  # relative to the working directory; created on first use


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
    "dist_timeout": POSITIVE, "prep_timeout": POSITIVE, "zero": Range(int, 2, 3),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class RunConfig:
    stage: str  # "pretrain" (stage 1, projector only) or "sft" (stage 2, projector + region)
    output_dir: str  # where the model, run.json and metrics.jsonl go
    overwrite: bool = False  # a fresh run may replace an earlier run in output_dir (its checkpoints are set aside)
    region: str | None = None  # region spec (lvlm_region.regions); stage default: none / uniform25
    model: str | None = None  # local transformers checkpoint dir; None = the embedded tiny demo model
    llm: str | None = None  # with vision: assemble the model from a causal-LM checkpoint dir (instead of model)
    vision: str | None = None  # the CLIP / SigLIP checkpoint dir to assemble with llm
    projector: str = "mlp2x_gelu"  # the projector type of an assembled model
    init: str | None = None  # stage-1 output dir whose projector starts this run
    init_projector: str | None = None  # a LLaVA / Bunny mm_projector.bin to start the projector from instead
    data: str | None = None  # JSON / JSONL / Parquet / Arrow / datasets dir, or a prepared dir; None = the demo's
    image_folder: str | None = None  # root of relative image paths; default: the data file's dir (prepared: its own)
    eval_data: str | None = None  # held-out data (sft), as --data; None = the demo's eval file when on demo data
    template: str | None = None  # plain | auto (the tokenizer's own) | vicuna_v1 | llama3 | phi3 | chatml;
    #                              stage default: plain / auto
    image_aspect_ratio: str | None = None  # pad (to a square, mean colour) | square; default: square for stage 1
    #                                        and for Qwen2-VL / Qwen2.5-VL, pad for stage 2 otherwise
    on_bad_sample: str = "skip"  # skip: drop and count each bad sample | error: stop at the first
    max_bad_fraction: float = 0.05  # more bad samples than this stops the run before training, with a summary
    verify_images: str = "decode"  # decode every image while preparing (finds truncated files) | header only
    allow_outside_images: bool = False  # accept absolute image paths (and paths leaving image_folder)
    prep_workers: int | None = None  # processes that prepare the data (default: the CPU count)
    prep_timeout: float = 300.0  # seconds: ranks waiting for rank 0's preparation stop after this long without its
    #                              heartbeat
    group_by_length: bool | None = None  # length-grouped batches, one modality each (LLaVA's group_by_modality_length);
    #                                      stage default: off / on
    packing: bool = False  # padding-free: a micro-batch's samples in one row, attention kept within each sample
    zero: int = 2  # ZeRO stage: 2 or 3 (picks ds_configs/zero{N}.json)
    ds_config: str | None = None  # any DeepSpeed JSON instead of ds_configs/zero{N}.json
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    epochs: float = 1.0  # passes over the training data when max_steps is None
    lr: float | None = None  # peak LR; default 1e-3 (pretrain) / 2e-5 (sft); 3e-3 / 1e-3 on the demo model
    warmup_ratio: float = 0.03  # linear warmup share of the steps, then cosine to zero
    weight_decay: float = 0.0
    micro_batch: int = 16  # samples per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    tuner: str = "full"  # full: the region's layers train whole | lora: LoRA adapters on their linears (peft)
    lora_r: int = 128  # LoRA rank (the paper's released recipe: r=128, alpha=256, dropout 0.05)
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    projector_lr: float | None = None  # peak LR of the projector; default: lr (full) / 2e-5 (lora), demo: lr
    grad_ckpt: bool = False  # activation checkpointing of the LLM (non-reentrant, works with frozen layers)
    attn: str = "sdpa"  # flash_attention_2 | sdpa | eager; flash falls back to sdpa (with a message) where it can't run
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    max_length: int = 2048  # longer samples are dropped and counted, never cut through image tokens
    seed: int = 0
    log_every: int = 10  # optimizer steps between metrics lines
    num_workers: int = 2  # DataLoader workers per rank (images are decoded there)
    eval_max_samples: int = 0  # 0 = every held-out sample
    max_new_tokens: int = 8  # generation budget per held-out answer
    save_every: int = 0  # steps between checkpoints, and one at the end (0: none; a stop request always saves one)
    keep_checkpoints: int = 2  # newest checkpoints kept in output_dir/checkpoints (0: all)
    resume: str | None = None  # "auto" (newest checkpoint in output_dir, if any) or a checkpoint directory
    compare_full: str | None = None  # N: then run N steps of the same job with region full; or a full run's dir
    export_model: bool = True  # write the transformers checkpoint at the end (off for the compare-full arm)
    dist_timeout: float = 30.0  # minutes; process-group timeout: a collective waiting longer than this fails the run
    peak_tflops: float | None = None  # peak TFLOP/s per rank for MFU; default: data sheet by GPU name / measured on CPU
    dataset_size: int | None = field(default=None, repr=False)  # filled in at run time (for run.json)

    def resolve(self) -> "RunConfig":
        """Fill stage defaults and validate; raises ValueError naming the field and the fix."""
        if self.stage not in ("pretrain", "sft"):
            raise ValueError(f"stage must be 'pretrain' or 'sft', got {self.stage!r}")
        if (self.llm is None) != (self.vision is None):
            raise ValueError("--llm and --vision go together: give both to assemble a model from its parts")
        if self.llm is not None and self.model is not None:
            raise ValueError("--model and --llm/--vision both give the model; pass one of them")
        demo = self.is_demo
        if self.region is None:
            self.region = "none" if self.stage == "pretrain" else "uniform25"
        if self.template is None:
            self.template = "plain" if self.stage == "pretrain" else "auto"
        if self.group_by_length is None:
            self.group_by_length = self.stage == "sft"
        if self.image_aspect_ratio is None:
            from .image_inputs import default_aspect
            family = None if self.llm is not None else _model_type(self.model_path)  # --llm assembles a Llava
            self.image_aspect_ratio = default_aspect(self.stage, family)
        from .images import ASPECTS
        from .prepare import check_options
        from .templates import NAMES
        if self.template not in NAMES:
            raise ValueError(f"--template must be one of {', '.join(NAMES)}, got {self.template!r}")
        if self.image_aspect_ratio not in ASPECTS:
            raise ValueError(f"--image-aspect-ratio must be one of {', '.join(ASPECTS)}, got "
                             f"{self.image_aspect_ratio!r}")
        check_options(self.on_bad_sample, self.max_bad_fraction, self.verify_images)
        if self.tuner not in ("full", "lora"):
            raise ValueError(f"--tuner must be full or lora, got {self.tuner!r}")
        lora = self.tuner == "lora"
        if self.lr is None:  # the tiny demo model learns from scratch-like weights: larger steps
            if self.stage == "pretrain":
                self.lr = 3e-3 if demo else 1e-3
            else:  # LoRA adapters: 10x the full-tuning rate, as in the paper's recipe (2e-4 vs 2e-5)
                self.lr = (1e-2 if lora else 1e-3) if demo else (2e-4 if lora else 2e-5)
        if self.projector_lr is None:
            self.projector_lr = 2e-5 if (lora and not demo) else (1e-3 if lora else self.lr)
        for name, valid in RANGES.items():  # the flags parse through the same ranges (cli)
            valid.check(flag(name), getattr(self, name))
        if self.data is None:
            if not demo:
                raise ValueError("--data is required with --model or --llm/--vision (the demo data only fits the "
                                 "demo model)")
            self.data = os.path.join(DEMO_DIR, "pretrain.json" if self.stage == "pretrain" else "sft_train.json")
            if self.stage == "sft" and self.eval_data is None:
                self.eval_data = os.path.join(DEMO_DIR, "sft_eval.json")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.compare_full is not None:
            if self.compare_full.isdigit():
                if int(self.compare_full) < 3:
                    raise ValueError("--compare-full N needs N >= 3 (the first steps are warm-up)")
            elif not os.path.isfile(os.path.join(self.compare_full, "run.json")):
                raise FileNotFoundError(f"--compare-full {self.compare_full}: neither a step count nor a run "
                                        f"directory with run.json")
        if self.ds_config is not None and not os.path.isfile(self.ds_config):
            raise FileNotFoundError(f"--ds-config {self.ds_config} does not exist")
        if self.init is not None and not os.path.isdir(self.init):
            raise FileNotFoundError(f"--init {self.init} is not a directory; give a stage-1 output directory")
        if self.init is not None and self.init_projector is not None:
            raise ValueError("--init and --init-projector both give the starting projector; pass one of them")
        if self.init_projector is not None and not os.path.isfile(self.init_projector):
            raise FileNotFoundError(f"--init-projector {self.init_projector}: no such file; give the mm_projector.bin "
                                    "of a LLaVA / Bunny stage-1 run")
        return self

    @property
    def is_demo(self) -> bool:
        return self.model is None and self.llm is None

    @property
    def model_path(self) -> str:
        """The transformers checkpoint the run starts from (an assembled model lives in OUTPUT_DIR/base_model)."""
        if self.llm is not None:
            return os.path.join(self.output_dir, "base_model")
        return self.model or os.path.join(DEMO_DIR, "base_model")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: str) -> "RunConfig":
        with open(path) as f:
            return cls(**json.load(f)["config"])


def _model_type(model_path: str) -> str | None:
    """The model_type in a checkpoint's config.json, if there is one to read (a missing one fails later, clearly)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None
