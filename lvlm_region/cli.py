"""Command-line flags shared by the launchers: they map one to one onto RunConfig fields."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from .config import RANGES, Range, RunConfig, flag
from .regions import VALID_FORMS


ALLOW_OUTSIDE_HELP = ("accept image paths outside --image-folder (absolute, '..', links leaving it); without it such "
                      "samples are dropped as image_outside_folder, unopened")


def number(name: str, valid: Range | None = None):
    """argparse type of the flag of field ``name``: its Range (``valid``, default config.RANGES[name]) refuses a value
    outside it at parse time, naming the flag and the valid range."""
    valid = valid or RANGES[name]

    def parse(text: str):
        try:
            return valid.parse(flag(name), text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = valid.kind.__name__  # what argparse names in its own messages
    return parse


def build_parser(stage: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_region = "none" if stage == "pretrain" else "uniform25"
    p.add_argument("--region", help=f"region spec (default {default_region}); {VALID_FORMS}")
    p.add_argument("--model", help="local transformers checkpoint dir (default: the embedded tiny demo model)")
    p.add_argument("--llm", help="causal-LM checkpoint dir (Llama, Vicuna, Mistral, Phi-3, Qwen2) to assemble with "
                                 "--vision into OUTPUT_DIR/base_model, instead of --model")
    p.add_argument("--vision", help="CLIP or SigLIP checkpoint dir (with preprocessor_config.json) for --llm")
    p.add_argument("--projector", default="mlp2x_gelu", help="projector of an assembled model (mlp2x_gelu)")
    p.add_argument("--init", help="stage-1 output dir whose projector starts this run")
    p.add_argument("--init-projector", metavar="FILE", help="LLaVA / Bunny stage-1 mm_projector.bin "
                   "(model.mm_projector.0/2.*) to start the projector from; shapes are checked before loading")
    p.add_argument("--data", help="LLaVA JSON / JSONL, messages+images JSON(L), Parquet, Arrow, a `datasets` dir, or "
                                  "a dir from data_prep/prepare.py (default: the generated demo data)")
    p.add_argument("--image-folder", help="root of the data's image paths (default: the data file's directory)")
    p.add_argument("--eval-data", help="held-out data (as --data) for loss and answer accuracy at the end")
    p.add_argument("--template", help="plain | auto (the tokenizer's own chat template) | vicuna_v1 | llama3 | phi3 | "
                                      f"chatml (default: {'plain' if stage == 'pretrain' else 'auto'})")
    p.add_argument("--image-aspect-ratio", help="pad (to a square in the mean colour, as LLaVA-1.5 SFT) | square "
                                                f"(default: {'square' if stage == 'pretrain' else 'pad'})")
    p.add_argument("--on-bad-sample", default="skip", help="skip (drop and count each, default) | error")
    p.add_argument("--max-bad-fraction", type=number("max_bad_fraction"), default=0.05,
                   help="stop before training when more of the samples than this are bad (default 0.05)")
    p.add_argument("--verify-images", default="decode", help="decode (every image while preparing, default) | "
                                                             "header (size checks only, faster)")
    p.add_argument("--allow-outside-images", action="store_true", help=ALLOW_OUTSIDE_HELP)
    p.add_argument("--prep-timeout", type=number("prep_timeout"), default=300.0,
                   help="seconds the other ranks wait without a heartbeat from rank 0 while it prepares raw data, "
                        "then stop with an error (default 300)")
    p.add_argument("--prep-workers", type=number("prep_workers"),
                   help="processes preparing the data (default: the CPU count)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                   help="batches of similar length, images and text-only apart, as LLaVA's group_by_modality_length "
                        f"(default: {'off' if stage == 'pretrain' else 'on'})")
    p.add_argument("--packing", action="store_true", help="padding-free: each micro-batch's samples in one row, "
                                                          "attention kept within each sample")
    p.add_argument("--output-dir", required=True, help="where the model, run.json and metrics.jsonl go")
    p.add_argument("--overwrite", action="store_true",
                   help="let a fresh run replace an earlier run in --output-dir (its checkpoints are moved to "
                        "checkpoints/abandoned/, never deleted)")
    p.add_argument("--zero", type=number("zero"), default=2, help="ZeRO stage 2 or 3 (ds_configs/zero{N}.json)")
    p.add_argument("--ds-config", help="a DeepSpeed JSON to use instead of ds_configs/zero{N}.json")
    p.add_argument("--max-steps", type=number("max_steps"), help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=number("epochs"), default=1.0)
    p.add_argument("--lr", type=number("lr"), help="peak learning rate (warmup then cosine)")
    p.add_argument("--warmup-ratio", type=number("warmup_ratio"), default=0.03)
    p.add_argument("--weight-decay", type=number("weight_decay"), default=0.0)
    p.add_argument("--micro-batch", type=number("micro_batch"), default=16, help="samples per rank per micro-step")
    p.add_argument("--grad-accum", type=number("grad_accum"), default=1)
    p.add_argument("--grad-clip", type=number("grad_clip"), default=1.0)
    p.add_argument("--tuner", default="full", help="full: the region's layers train whole (default) | lora: LoRA "
                                                    "(peft) on every linear of the region's layers, projector whole")
    p.add_argument("--lora-r", type=number("lora_r"), default=128)
    p.add_argument("--lora-alpha", type=number("lora_alpha"), default=256)
    p.add_argument("--lora-dropout", type=number("lora_dropout"), default=0.05)
    p.add_argument("--projector-lr", type=number("projector_lr"),
                   help="peak LR of the projector (default: --lr; with --tuner lora "
                                                       "2e-5, the paper's recipe)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the LLM")
    p.add_argument("--attn", default="sdpa", help="flash_attention_2 | sdpa | eager (flash needs a GPU, bf16/fp16 "
                                                   "and the gpu extra; otherwise the run says so and uses sdpa)")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--max-length", type=number("max_length"), default=2048)
    p.add_argument("--seed", type=number("seed"), default=0)
    p.add_argument("--log-every", type=number("log_every"), default=10)
    p.add_argument("--num-workers", type=number("num_workers"), default=2)
    p.add_argument("--eval-max-samples", type=number("eval_max_samples"), default=0)
    p.add_argument("--save-every", type=number("save_every"), default=0,
                   help="optimizer steps between checkpoints in OUTPUT_DIR/checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=number("keep_checkpoints"), default=2,
                   help="newest checkpoints kept (0: all)")
    p.add_argument("--resume", help="'auto': continue from the newest checkpoint in --output-dir (fresh start if "
                                    "there is none); or a checkpoint directory")
    p.add_argument("--compare-full", metavar="N|DIR",
                   help="after the run, time N steps of the same job with --region full (same data, batch, ZeRO, "
                        "checkpointing, seed) and project both arms' GPU-hours per epoch; or a finished full run's dir")
    p.add_argument("--dist-timeout", type=number("dist_timeout"), default=30.0,
                   help="minutes a collective may wait for the other ranks before the run fails (process-group "
                        "timeout; default 30, DeepSpeed's)")
    p.add_argument("--peak-tflops", type=number("peak_tflops"),
                   help="peak TFLOP/s per GPU for MFU (default: bf16 data sheet "
                                                       "by GPU name; on CPU a measured matmul)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    return p


def parse(stage: str, doc: str, argv: list[str] | None = None) -> RunConfig:
    args = vars(build_parser(stage, doc).parse_args(argv))
    args.pop("local_rank")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(stage=stage, **{k: v for k, v in args.items() if k in fields})


def main(stage: str, doc: str, argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    from .trainer import TrainingDiverged, train_and_compare  # after logging is set up; heavy imports

    cfg = parse(stage, doc, argv)
    try:
        result = train_and_compare(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a checkpoint that could not be written (disk full, quota)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    s = result.summary
    if s["status"] == "interrupted" and os.environ.get("RANK", "0") == "0":
        print(f"stopped at step {s['steps_done']} ({s['stop_reason']}); checkpoint {s['checkpoint']}; "
              f"continue with the same command plus --resume auto")
    if s.get("eval") and os.environ.get("RANK", "0") == "0":
        print(f"held-out answer accuracy {s['eval']['accuracy']:.3f} ({s['eval']['correct']}/{s['eval']['samples']})")
    return 0
