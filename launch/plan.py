"""Plan a run before booking GPUs: memory per GPU and projected GPU-hours of every ZeRO stage, optimizer offload,
activation checkpointing and micro-batch, for a region and for full tuning, from the model's config.json alone.

    python launch/plan.py --model CKPT --gpus 8 --gpu A100-80GB --region uniform25 --seq-len 2048 --samples 665000 \\
        --global-batch 128 --json plan.json
    python launch/plan.py --model CKPT --gpus 4 --gpu H100-80GB --data runs/sft/prepared/train --calibrate runs/sft

Memory: model states as DeepSpeed counts them (per parameter, frozen ones only their 16-bit weights), the
activations autograd keeps (counted on the meta device with the region's requires_grad), an allowance for buffers
and fragmentation. Step time: the project's FLOP model at an assumed MFU (--assumed-mfu) or the one a finished run
measured (--calibrate RUN_DIR). Prints a table and the ratio of the best plan's GPU-hours to the best full-tuning
plan's; --json writes every candidate. A projection: see lvlm_region/plan.py for every assumption.
Exit status: 0 done, 2 bad input.
"""
import argparse
import json
import logging
import math
import sys


def main(argv=None) -> int:
    from lvlm_region.plan import ASSUMED_MFU, GPUS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", required=True, help="a transformers checkpoint directory (only config.json is read)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the allocation (default 8)")
    p.add_argument("--gpu", default="A100-80GB", help=f"one of {', '.join(GPUS)} (default A100-80GB); another "
                                                      "with --gpu-memory-gb and --peak-tflops")
    p.add_argument("--gpu-memory-gb", type=float, help="memory per GPU in GiB (overrides the table)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU in TFLOP/s (overrides the table)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="bf16 (default) | fp16 | fp32: the bytes of weights, optimizer states and activations")
    p.add_argument("--region", default="uniform25", help="region spec (default uniform25); compared with full")
    p.add_argument("--tuner", default="full", choices=("full", "lora"),
                   help="full (default) or lora: the region's layers train rank-r adapters; compared with full tuning")
    p.add_argument("--lora-r", type=int, default=128, help="LoRA rank (default 128, the trainer's)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05, the trainer's)")
    p.add_argument("--data", help="a prepared data directory: its 95th-percentile length (step time), longest "
                                   "sample (memory), trained fraction and images per sample")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample when no --data (default 2048)")
    p.add_argument("--trained-fraction", type=float, default=1.0,
                   help="share of positions the loss reads when no --data (default 1.0: an upper bound)")
    p.add_argument("--images", type=int, default=1, help="images per sample when no --data (default 1)")
    p.add_argument("--image-size", type=int, help="Qwen2-VL: the side images are resized to (default 448)")
    p.add_argument("--samples", type=int, default=665_000, help="samples of one epoch (default 665,000: LLaVA-665K)")
    p.add_argument("--global-batch", type=int, default=128, help="samples per optimizer step (default 128)")
    p.add_argument("--assumed-mfu", type=float, default=ASSUMED_MFU,
                   help=f"model FLOPs utilisation assumed for the step time (default {ASSUMED_MFU})")
    p.add_argument("--calibrate", metavar="RUN_DIR", help="use the MFU a finished run measured (its run.json)")
    p.add_argument("--json", help="write every candidate, the best plans and the ratio to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from lvlm_region.plan import PlanError, Setting, calibrated_mfu, from_prepared, plan, table

    for name in ("gpus", "seq_len", "images", "samples", "global_batch", "lora_r"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    for name, value in (("--peak-tflops", args.peak_tflops), ("--gpu-memory-gb", args.gpu_memory_gb)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            print(f"error: {name} must be a finite number > 0, got {value}", file=sys.stderr)
            return 2
    for name, value in (("--assumed-mfu", args.assumed_mfu), ("--trained-fraction", args.trained_fraction)):
        if not 0 < value <= 1:
            print(f"error: {name} must be in (0, 1], got {value}", file=sys.stderr)
            return 2
    try:
        shape = (from_prepared(args.data) if args.data else
                 {"seq_len": args.seq_len, "trained_fraction": args.trained_fraction, "images": args.images})
        mfu, source = ((calibrated_mfu(args.calibrate), f"measured by {args.calibrate}") if args.calibrate
                       else (args.assumed_mfu, "assumed"))
        out = plan(Setting(model=args.model, region=args.region, tuner=args.tuner, lora_r=args.lora_r,
                           lora_dropout=args.lora_dropout, gpus=args.gpus, gpu=args.gpu,
                           gpu_memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops, **shape,
                           samples=args.samples, global_batch=args.global_batch, mfu=mfu, mfu_source=source,
                           image_size=args.image_size, precision=args.precision))
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(out), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
