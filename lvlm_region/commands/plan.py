"""Plan a run before booking GPUs: memory per GPU and projected GPU-hours of every ZeRO stage, optimizer offload,
activation checkpointing and micro-batch, for a region and for full tuning, from the model's config.json alone.

    python launch/plan.py --model CKPT --gpus 8 --gpu A100-80GB --region uniform25 --seq-len 2048 --samples 665000 \\
        --global-batch 128 --json plan.json
    python launch/plan.py --model CKPT --gpus 4 --gpu H100-80GB --data runs/sft/prepared/train --calibrate runs/sft

Memory: model states as DeepSpeed counts them (per parameter, frozen ones only their 16-bit weights), the
activations autograd keeps (counted on the meta device with the region's requires_grad), an allowance for buffers
and fragmentation. Time: the project's FLOP model over the epoch's micro-batches as the run batches them (--data
or --lengths; else every sample --seq-len long) at the hardware utilisation an assumed MFU implies (--assumed-mfu)
or a finished run measured (--calibrate RUN_DIR). Prints a table and the ratio of the best plan's GPU-hours to the
best full-tuning plan's; --json writes every candidate. A projection: see lvlm_region/train/plan.py for every
assumption.
Also: lvlm-region plan --model CKPT ... (the same flags).
Exit status: 0 done, 2 bad input.
"""
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass

from ..config import Range, setting
from ..infra import hub
from ..train import cli
from ..train.plan import ASSUMED_MFU


@dataclass
class Settings:
    """plan's flags besides plan.Setting's."""

    data: str | None = setting(None, "a prepared data directory: its samples' lengths (step time: batched as the run "
                                     "batches them), longest sample (memory), trained fraction, images per sample "
                                     "and image sizes")
    lengths: str | None = setting(None, "the samples' lengths without prepared data: a JSON object {length: samples} "
                                        "or lines 'length samples'", metavar="FILE")
    assumed_mfu: float = setting(ASSUMED_MFU, "model FLOPs utilisation of LLaVA-style training with activation "
                                              "checkpointing (LLaVA's own recipe); plans run at the hardware "
                                              "utilisation it implies", valid=Range(float, 0, 1, low_open=True))
    calibrate: str | None = setting(None, "run every plan at the hardware FLOPs utilisation a finished run "
                                          "measured (its run.json)", metavar="RUN_DIR")
    json: str | None = setting(None, "write every candidate, the best plans and the ratio to this file")


def parser():
    from ..train.plan import Setting

    p = cli.command_parser(__doc__)
    cli.add_flags(p, settings=Setting)
    cli.add_flags(p, settings=Settings)
    return p


def main(argv=None) -> int:
    from ..train.plan import PlanError, Setting, calibrated, from_prepared, plan, read_lengths, table

    args = cli.command_values(parser(), argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    own = {f.name: args.pop(f.name) for f in dataclasses.fields(Settings)}
    try:
        args["model"] = hub.local_path(args["model"], config_only=True)  # only config.json is read
        if own["data"] and own["lengths"]:
            raise PlanError("give --data or --lengths, not both: both give the samples' lengths")
        if own["data"]:  # the prepared data's shape replaces the flags' one
            args.update(from_prepared(own["data"]))
        if own["lengths"]:
            args.update(read_lengths(own["lengths"]))
        rates = {"mfu": own["assumed_mfu"], "mfu_source": "assumed"}
        if own["calibrate"]:
            mfu, hfu = calibrated(own["calibrate"])
            rates = {"mfu": mfu, "hfu": hfu, "mfu_source": f"measured by {own['calibrate']}"}
        out = plan(Setting(**args, **rates))
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(out), end="")
    if own["json"]:
        with open(own["json"], "w") as f:
            json.dump(out, f, indent=1)
        print(f"-> {own['json']}")
    return 0
