"""Cost report from run directories: GPU-hours saved against full tuning, measured.

    python launch/report.py runs/sft-u25 runs/sft-full --output reports/u25
    python launch/report.py runs/sft-u25 --baseline runs/sft-full --output reports/u25 \\
        --price-per-gpu-hour 2.5 --project-samples 665000 --project-nodes 4 --project-gpu A100

Writes report.md (+ PNG plots), a self-contained report.html, report.json and report.csv into --output.
The baseline is --baseline, else the run whose region is `full`.
"""
import logging
import sys
from dataclasses import dataclass

from ..config import AT_LEAST_1, Range, setting
from ..infra.timing import PEAK_TFLOPS
from ..train import cli


@dataclass
class Settings:
    runs: list = setting(None, "run directories (each with run.json and metrics.jsonl)", positional=True, nargs="+",
                         required=True)
    output: str = setting(None, "directory for the report files", required=True)
    baseline: str | None = setting(None, "the full-tuning run directory", default_help="the run with region 'full'")
    price_per_gpu_hour: float = setting(2.0, "for the cost column", valid=Range(float, 0))
    project_samples: int | None = setting(None, "project GPU-hours for a data set of this many samples",
                                          valid=AT_LEAST_1)
    project_nodes: int = setting(1, "nodes of the projection", valid=AT_LEAST_1)
    gpus_per_node: int = setting(8, "GPUs per node of the projection", valid=AT_LEAST_1)
    project_gpu: str = setting("A100", "the GPU of the projection", choices=tuple(sorted(PEAK_TFLOPS)))
    assumed_mfu: float = setting(0.4, "MFU assumed when the runs were measured on other hardware than --project-gpu",
                                 valid=Range(float, 0, 1, low_open=True))


def parser():
    p = cli.command_parser(__doc__)
    cli.add_flags(p, settings=Settings)
    return p


def main(argv=None) -> int:
    from ..tools.report import Projection, ReportError, build, write

    args = cli.command_values(parser(), argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    projection = (Projection(args["project_samples"], args["project_nodes"], args["gpus_per_node"],
                             args["project_gpu"], args["assumed_mfu"]) if args["project_samples"] else None)
    try:
        report = build(args["runs"], args["baseline"], args["price_per_gpu_hour"], projection)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = write(report, args["output"])
    for problem in report["problems"]:
        print(f"left out: {problem}", file=sys.stderr)
    for c in report["comparisons"]:
        if c["gpu_hours_saved"] is not None:
            doubt = (f" -- NOT TO BE TRUSTED ({', '.join(f['check'] for f in c['flags'])}: see report.md; remedy: "
                     "--compare-full)" if c["flags"] else "")
            print(f"{c['run']}: {c['gpu_hours_saved']:.4g} GPU-hours saved ({c['gpu_hours_saved_pct']:.1f}%) against "
                  f"{c['baseline']}; step-time ratio {c['step_time_ratio']:.3f} (FLOP model {c['ideal_ratio']:.3f})"
                  f"{doubt}")
    print(f"wrote {', '.join(files)} to {args['output']}")
    return 0
