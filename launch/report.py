"""Cost report from run directories: GPU-hours saved against full tuning, measured.

    python launch/report.py runs/sft-u25 runs/sft-full --output reports/u25
    python launch/report.py runs/sft-u25 --baseline runs/sft-full --output reports/u25 \\
        --price-per-gpu-hour 2.5 --project-samples 665000 --project-nodes 4 --project-gpu A100

Writes report.md (+ PNG plots), a self-contained report.html, report.json and report.csv into --output.
The baseline is --baseline, else the run whose region is `full`.
"""
import argparse
import logging
import sys

from lvlm_region.cli import number
from lvlm_region.config import AT_LEAST_1, Range
from lvlm_region.report import Projection, ReportError, build, write
from lvlm_region.timing import PEAK_TFLOPS


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="run directories (each with run.json and metrics.jsonl)")
    p.add_argument("--output", required=True, help="directory for the report files")
    p.add_argument("--baseline", help="the full-tuning run directory (default: the run with region 'full')")
    p.add_argument("--price-per-gpu-hour", type=number("price_per_gpu_hour", Range(float, 0)), default=2.0,
                   help="for the cost column (default 2.0)")
    p.add_argument("--project-samples", type=number("project_samples", AT_LEAST_1),
                   help="project GPU-hours for a data set of this many samples")
    p.add_argument("--project-nodes", type=number("project_nodes", AT_LEAST_1), default=1)
    p.add_argument("--gpus-per-node", type=number("gpus_per_node", AT_LEAST_1), default=8)
    p.add_argument("--project-gpu", default="A100", choices=sorted(PEAK_TFLOPS))
    p.add_argument("--assumed-mfu", type=number("assumed_mfu", Range(float, 0, 1, low_open=True)), default=0.4,
                   help="MFU assumed when the runs were measured on other hardware than --project-gpu")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    projection = (Projection(args.project_samples, args.project_nodes, args.gpus_per_node, args.project_gpu,
                             args.assumed_mfu) if args.project_samples else None)
    try:
        report = build(args.runs, args.baseline, args.price_per_gpu_hour, projection)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = write(report, args.output)
    for problem in report["problems"]:
        print(f"left out: {problem}", file=sys.stderr)
    for c in report["comparisons"]:
        if c["gpu_hours_saved"] is not None:
            doubt = (f" -- NOT TO BE TRUSTED ({', '.join(f['check'] for f in c['flags'])}: see report.md; remedy: "
                     "--compare-full)" if c["flags"] else "")
            print(f"{c['run']}: {c['gpu_hours_saved']:.4g} GPU-hours saved ({c['gpu_hours_saved_pct']:.1f}%) against "
                  f"{c['baseline']}; step-time ratio {c['step_time_ratio']:.3f} (FLOP model {c['ideal_ratio']:.3f})"
                  f"{doubt}")
    print(f"wrote {', '.join(files)} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
