"""Compare regions: stage 2 once per region and seed from the same stage-1 projector, data and schedule, then one
report with a row per region (accuracy and its spread over seeds, relative to full, per category, text retention,
held-out loss, step time, GPU-hours and relative to full) and plots, beside the starting model evaluated the same
way (OUTPUT_DIR/stage1/eval.json).

    python launch/compare.py --regions full,uniform25,first25,last25,middle25 --init runs/pretrain \\
        --output-dir runs/compare                                     # the demo, one CPU rank per arm
    python launch/compare.py --regions full,uniform25 --seeds 1,2,3 --gpus 8 --model CKPT --init runs/pretrain \\
        --data mix.json --image-folder IMG --eval-data eval.json --zero 3 --output-dir runs/compare

Every flag after the known ones goes to launch/sft.py unchanged, the same for every arm (compare sets --region,
--seed and --output-dir per arm; an entry SPEC~SCHEDULE, e.g. full~random:2/10, is an arm whose region moves:
--region SPEC --region-schedule SCHEDULE).
Writes OUTPUT_DIR/report.{md,html,json,csv} and OUTPUT_DIR/arms/<region>-seed<S>/.
Run again: finished arms are reused, an interrupted one continues (with --save-every, from its checkpoint).
--config FILE: compare's own keys, and any launch/sft.py flag for the arms (the command line's come after).
The accuracy is each arm's end-of-run evaluation on --eval-data (the code launch/evaluate.py runs).
On SLURM, launch/slurm/compare.sbatch runs the arms as an array job (--arm) and the report after them
(--report-only). Exit status: 0 done, 2 bad input or a failed arm.
"""
import argparse
import sys
from dataclasses import dataclass

from ..config import AT_LEAST_0, AT_LEAST_1, setting
from ..train import cli


@dataclass
class Settings:
    """compare's flags; every other flag goes to the arms (launch/sft.py)."""

    regions: str = setting(None, "comma-separated region specs, e.g. full,uniform25,first25; SPEC~SCHEDULE: a moving "
                                 "region (full~random:2/10)", required=True)
    seeds: str = setting("0", "comma-separated seeds; each region trains once per seed")
    gpus: int = setting(1, "ranks per arm", valid=AT_LEAST_1)
    output_dir: str = setting(None, "where the arms and the report go", required=True)
    list_arms: bool = setting(False, "check the specs, print the arms ('arm NAME', one per line, regions x seeds "
                                     "order) and exit")
    arm: int | None = setting(None, "train only this arm (index in --list-arms order) and write no report: a SLURM "
                                    "array task", valid=AT_LEAST_0)
    report_only: bool = setting(False, "train nothing; report arms other jobs finished")


def parser():
    # No abbreviations: --region and --seed must reach the arms' check (refused there), not become --regions / --seeds.
    p = cli.command_parser(__doc__)
    cli.add_flags(p, settings=Settings)
    return p


def split_config(p: argparse.ArgumentParser, argv: list[str] | None) -> list[str]:
    """--config's file: compare's own keys become ``p``'s defaults; the arms' (launch/sft.py flags) are returned as
    arguments to put before the command line's own pass-through flags (which so win)."""
    path = cli.config_path(argv)
    if not path:
        return []
    data = cli.read_config_file(path)
    own = cli.flag_actions(p)
    cli.apply_config(p, {k: v for k, v in data.items() if cli.config_dest(k) in own}, f"--config {path}")
    return cli.config_argv(cli.build_parser("sft", ""), {k: v for k, v in data.items()
                                                         if cli.config_dest(k) not in own}, f"--config {path}")


def main(argv=None) -> int:
    p = parser()
    try:
        from_file = split_config(p, argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args, passthrough = p.parse_known_args(argv)
    passthrough = from_file + passthrough
    cli.log_to_stdout()
    from ..tools.compare import arm_name, check_specs, compare, parse_seeds, split_regions

    try:
        seeds = parse_seeds(args.seeds)
        specs = split_regions(args.regions)
        if args.list_arms:
            check_specs(specs, passthrough)
            print("\n".join(f"arm {arm_name(spec, seed)}" for spec in specs for seed in seeds))
            return 0
        rep = compare(specs, seeds, args.output_dir, args.gpus, passthrough, args.arm, args.report_only)
    except ValueError as e:  # CompareError, a bad seed
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.arm is not None:
        print(f"arm {rep['arms'][0]['name']}: {rep['arms'][0]['status']}")
        return 0
    for g in rep["regions"]:
        print(f"{g['region']}: accuracy {g['accuracy']:.3f} (relative to full {_f(g['accuracy_vs_full'])}), "
              f"GPU-hours {g['gpu_hours']:.4g} (relative to full {_f(g['gpu_hours_vs_full'])})")
    print(f"report: {args.output_dir}/report.md")
    return 0


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
