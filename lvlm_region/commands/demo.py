"""Both stages on the embedded default: a tiny LlavaForConditionalGeneration and generated data (data/demo/,
made on first use, about 6.5 minutes on 2 CPU cores), on CPU or GPU, one process per stage.

    lvlm-region demo                                  # OUTPUT_DIR/pretrain, then OUTPUT_DIR/sft-uniform25
    lvlm-region demo --report-to tensorboard          # then: tensorboard --logdir runs/demo
    lvlm-region demo --region first25 --output-dir runs/demo-first25

The same as `lvlm-region pretrain --output-dir OUTPUT_DIR/pretrain` and `lvlm-region sft --region REGION --init
OUTPUT_DIR/pretrain --output-dir OUTPUT_DIR/sft-REGION`, each with --resume auto: run again, a finished stage is
left as it is ("already complete") and an interrupted one continues from its checkpoint.
Exit status: the first failing stage's, else 0.
"""
import os
import subprocess
import sys
from dataclasses import dataclass

from ..config import same_as, setting
from ..train import cli


@dataclass
class Settings:
    output_dir: str = setting("runs/demo", "where the two stages' run directories go")
    region: str = same_as("region", default_help=None)
    report_to: str = same_as("report_to")


def parser():
    p = cli.command_parser(__doc__)
    cli.add_flags(p, settings=Settings)
    return p


def stages(output_dir: str, region: str, report_to: str) -> list[list[str]]:
    """The two stages' commands (lvlm-region's arguments)."""
    pre = os.path.join(output_dir, "pretrain")
    common = ["--resume", "auto", "--report-to", report_to]
    return [["pretrain", "--output-dir", pre, *common],
            ["sft", "--region", region, "--init", pre, "--output-dir",
             os.path.join(output_dir, "sft-" + region.replace("/", "_")), *common]]


def main(argv=None) -> int:
    args = cli.command_values(parser(), argv)
    for cmd in stages(args["output_dir"], args["region"], args["report_to"]):
        print(f"lvlm-region {' '.join(cmd)}", flush=True)
        code = subprocess.call([sys.executable, "-m", "lvlm_region", *cmd])
        if code:
            return code
    print(f"demo done: {args['output_dir']}/pretrain and {args['output_dir']}/sft-{args['region']}"
          + (f"; tensorboard --logdir {args['output_dir']}" if "tensorboard" in args["report_to"] else ""))
    return 0
