"""Command-line flags shared by the launchers: they map one to one onto RunConfig fields."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from .config import RunConfig
from .regions import VALID_FORMS


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
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="stop before training when more of the samples than this are bad (default 0.05)")
    p.add_argument("--verify-images", default="decode", help="decode (every image while preparing, default) | "
                                                             "header (size checks only, faster)")
    p.add_argument("--prep-workers", type=int, help="processes preparing the data (default: the CPU count)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                   help="batches of similar length, images and text-only apart, as LLaVA's group_by_modality_length "
                        f"(default: {'off' if stage == 'pretrain' else 'on'})")
    p.add_argument("--packing", action="store_true", help="padding-free: each micro-batch's samples in one row, "
                                                          "attention kept within each sample")
    p.add_argument("--output-dir", required=True, help="where the model, run.json and metrics.jsonl go")
    p.add_argument("--zero", type=int, default=2, help="ZeRO stage 2 or 3 (ds_configs/zero{N}.json)")
    p.add_argument("--ds-config", help="a DeepSpeed JSON to use instead of ds_configs/zero{N}.json")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, help="peak learning rate (warmup then cosine)")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--micro-batch", type=int, default=16, help="samples per rank per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--tuner", default="full", help="full: the region's layers train whole (default) | lora: LoRA "
                                                    "(peft) on every linear of the region's layers, projector whole")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=int, default=256)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--projector-lr", type=float, help="peak LR of the projector (default: --lr; with --tuner lora "
                                                       "2e-5, the paper's recipe)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the LLM")
    p.add_argument("--attn", default="sdpa", help="flash_attention_2 | sdpa | eager (flash needs a GPU, bf16/fp16 "
                                                   "and the gpu extra; otherwise the run says so and uses sdpa)")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--eval-max-samples", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0,
                   help="optimizer steps between checkpoints in OUTPUT_DIR/checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    p.add_argument("--resume", help="'auto': continue from the newest checkpoint in --output-dir (fresh start if "
                                    "there is none); or a checkpoint directory")
    p.add_argument("--compare-full", metavar="N|DIR",
                   help="after the run, time N steps of the same job with --region full (same data, batch, ZeRO, "
                        "checkpointing, seed) and project both arms' GPU-hours per epoch; or a finished full run's dir")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per GPU for MFU (default: bf16 data sheet "
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
    from .trainer import train_and_compare  # after logging is set up; heavy imports

    cfg = parse(stage, doc, argv)
    try:
        result = train_and_compare(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a checkpoint that could not be written (disk full, quota)
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = result.summary
    if s["status"] == "interrupted" and os.environ.get("RANK", "0") == "0":
        print(f"stopped at step {s['steps_done']} ({s['stop_reason']}); checkpoint {s['checkpoint']}; "
              f"continue with the same command plus --resume auto")
    if s.get("eval") and os.environ.get("RANK", "0") == "0":
        print(f"held-out answer accuracy {s['eval']['accuracy']:.3f} ({s['eval']['correct']}/{s['eval']['samples']})")
    return 0
