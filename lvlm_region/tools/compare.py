"""The region comparison (launch/compare.py): stage 2 once per region and seed from the same stage-1 projector,
data, schedule and batch, each arm its own DeepSpeed launch of launch/sft.py; then one report with a row per
region (report.by_region) through the cost report generator.

Each arm lives in OUTPUT_DIR/arms/<region>-seed<S>/ with the command it was started with (compare.json). Run
again, a finished arm with the same command is reused, an unfinished one continues (--resume auto), one started
with another command is refused. Every spec is resolved against the model before any arm starts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from transformers import AutoConfig

from ..config import DEMO_DIR, RANGES, TEXT_EVAL, flag
from ..data import demo
from ..infra import outputs
from ..model import regions, schedule
from ..model.families import find_parts
from ..model.load import num_decoder_layers, skeleton
from ..train import checkpoint
from . import report

log = logging.getLogger(__name__)

SFT = Path(__file__).resolve().parents[2] / "launch" / "sft.py"
EVALUATE = SFT.parent / "evaluate.py"
OWNED = ("--region", "--region-schedule", "--seed", "--output-dir", "--resume", "--overwrite")  # set per arm
MOVING = "~"  # an arm's region and its --region-schedule: full~random:2/10
ARM_FILE = "compare.json"


class CompareError(ValueError):
    """A comparison that cannot run as asked, with what to change."""


def split_regions(text: str) -> list[str]:
    """``full,uniform25,layers:1,5,9`` -> ['full', 'uniform25', 'layers:1,5,9']: a bare number continues the
    ``layers:`` list before it (specs are otherwise comma-free), with its parts and a moving arm's ``~SCHEDULE``."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if specs and re.fullmatch(r"\d+([+-]\w+)*(~.*)?", part) and specs[-1].startswith("layers:"):
            specs[-1] += "," + part
        elif part:
            specs.append(part)
    if not specs:
        raise CompareError("--regions is empty; give e.g. full,uniform25,first25,last25,middle25")
    if len(set(specs)) != len(specs):
        raise CompareError(f"--regions names a region twice: {specs}")
    return specs


def split_arm(entry: str) -> tuple[str, str | None]:
    """``full~random:2/10`` -> ('full', 'random:2/10'): an arm's region spec and its --region-schedule (None: the
    region stays)."""
    spec, sep, moving = entry.partition(MOVING)
    return spec, (moving if sep else None)


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]; refused: an empty list, a bad seed, a seed given twice (one arm trained twice)."""
    seeds = [RANGES["seed"].parse("--seeds", s.strip()) for s in text.split(",") if s.strip()]
    if not seeds:
        raise CompareError(f"--seeds {text!r} names no seed; give e.g. --seeds 0,1,2")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise CompareError(f"--seeds {text!r} names seed {twice[0]} twice: each region would train the same arm "
                           "twice (one folder) and the spread over seeds would be false; give distinct seeds")
    return seeds


def check_specs(specs: list[str], passthrough: list[str]) -> int:
    """Check the flags every arm gets (launch/sft.py's own parser: an unknown or abbreviated flag is refused here,
    not in every arm), that no two specs share an arm folder, and resolve every spec against the model (its config
    only: the demo's depth is known without building it), before any arm starts; returns the model's depth."""
    owned = sorted({a.split("=")[0] for a in passthrough if a.split("=")[0] in OWNED})
    if owned:
        raise CompareError(f"{', '.join(owned)}: launch/compare.py sets these per arm (--regions, --seeds, "
                           "--output-dir); leave them out")
    check_arm_flags(passthrough)
    names: dict[str, str] = {}
    for spec in specs:
        other = names.setdefault(arm_name(spec, 0), spec)
        if other != spec:
            raise CompareError(f"--regions: {other!r} and {spec!r} would share the arm folder "
                               f"{arm_name(spec, 0)[:-len('-seed0')]}-seed<S>; name each region once (a scores file "
                               "by one path)")
    if "--llm" in passthrough:
        raise CompareError("--llm/--vision: assemble the model once (launch/pretrain.py) and compare with --model "
                           "OUTPUT_DIR/base_model and --init OUTPUT_DIR")
    model = _flag(passthrough, "--model")
    if model is None:  # the demo model: its depth and tying are known before it is built
        config = demo.planned_config()
    elif not os.path.isfile(os.path.join(model, "config.json")):
        raise CompareError(f"--model {model}: no config.json; give a local transformers checkpoint dir")
    else:
        config = AutoConfig.from_pretrained(model)
    depth = num_decoder_layers(config)
    tied = find_parts(skeleton(config)).tied
    for entry in specs:
        spec, moving = split_arm(entry)
        try:
            region = regions.resolve(spec, depth, tied=tied)
            if moving is not None:
                schedule.resolve(moving, region, seed=0)
        except ValueError as e:
            raise CompareError(f"--regions: {e}") from None
    return depth


def _flag(args: list[str], name: str) -> str | None:
    """The value the arms' launcher will see for ``name``: the last occurrence, as argparse takes it."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def check_arm_flags(passthrough: list[str]) -> None:
    """Parse the arms' flags with launch/sft.py's parser (no abbreviations), so a typo fails before any arm."""
    from ..train.cli import build_parser

    parser = build_parser("sft", "")
    parser.exit_on_error = False
    try:
        _, unknown = parser.parse_known_args([*passthrough, "--output-dir", "x"])
    except argparse.ArgumentError as e:
        raise CompareError(f"a flag for the arms (launch/sft.py): {e}") from None
    if unknown:
        raise CompareError(f"launch/sft.py has no flag {unknown[0]} (abbreviations are not taken either); see "
                           "python launch/sft.py --help")


def arm_name(spec: str, seed: int) -> str:
    """The arm's folder name: the spec with runs of characters other than letters, digits, + and - as one _."""
    return re.sub(r"[^A-Za-z0-9+-]+", "_", spec).strip("_") + f"-seed{seed}"


def arm_command(spec: str, seed: int, arm_dir: str, gpus: int, passthrough: list[str]) -> list[str]:
    with socket.socket() as s:  # a free port per launch: arms run one after another, never sharing one
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus), "--master_port", port,
            str(SFT), *region_flags(spec), "--seed", str(seed), "--output-dir", arm_dir, *passthrough]


def region_flags(entry: str) -> list[str]:
    """launch/sft.py's flags for an arm's --regions entry."""
    spec, moving = split_arm(entry)
    return ["--region", spec, *(["--region-schedule", moving] if moving is not None else [])]


HASH_WHOLE = 512 * 2 ** 20  # files up to this size are hashed whole; larger ones by size, mtime and their ends
SKIP_DIRS = ("checkpoints", "prepared", "eval", "abandoned", "importance")  # a run's own subfolders


def file_fingerprint(path: str) -> str:
    """A content fingerprint of one file: its size and SHA-256 (of the whole file up to HASH_WHOLE bytes; of a larger
    one, its first and last MiB and its modification time: a 14 GB weight file is not read whole on every rerun)."""
    st = os.stat(path)
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        if st.st_size <= HASH_WHOLE:
            for block in iter(lambda: f.read(2 ** 20), b""):
                h.update(block)
        else:
            h.update(f.read(2 ** 20))
            f.seek(-2 ** 20, os.SEEK_END)
            h.update(f.read(2 ** 20) + str(st.st_mtime_ns).encode())
    return f"{st.st_size}:{h.hexdigest()[:16]}"


def fingerprint(path: str | None) -> str | dict | None:
    """What an input is, by content: a file's fingerprint; a directory's top-level files' (a model, a stage-1 run, a
    prepared set: its prepare.json and state), without the run's own subfolders (checkpoints, prepared data)."""
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return file_fingerprint(path)
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            out[name] = file_fingerprint(full)
        elif os.path.isdir(full) and name not in SKIP_DIRS and not name.startswith("."):
            out[name] = fingerprint(full)
    return out


INPUT_FLAGS = ("--model", "--init", "--init-projector", "--data", "--eval-data", "--text-eval-data", "--ds-config")


def input_fingerprints(passthrough: list[str], spec: str | None = None) -> dict:
    """The content of every input an arm (or the baseline) reads, by flag: a retrained --init, edited data or a
    changed scores file behind the same path gives another fingerprint. The demo's files stand in for --model and
    the data when they are not given. Image folders are not read (their files are named by the data)."""
    demo_data = _flag(passthrough, "--data") is None
    defaults = {"--model": os.path.join(DEMO_DIR, "base_model")} if _flag(passthrough, "--model") is None else {}
    if demo_data:
        defaults.update({"--data": os.path.join(DEMO_DIR, "sft_train.json"),
                         "--eval-data": os.path.join(DEMO_DIR, "sft_eval.json"),
                         "--text-eval-data": os.path.join(DEMO_DIR, TEXT_EVAL)})
    out = {name: fingerprint(_flag(passthrough, name) or defaults.get(name)) for name in INPUT_FLAGS}
    spec = spec and split_arm(spec)[0]
    if spec is not None and "@" in spec:
        out["scores"] = fingerprint(regions.scores_path(spec))
    return out


def _differences(before: dict, now: dict) -> str:
    """What differs between two compare.json records, for a refusal: each setting's two values; for the inputs, the
    flags whose files' contents changed."""
    out = []
    for k in dict.fromkeys([*before, *now]):
        if before.get(k) == now.get(k):
            continue
        if k == "inputs" and isinstance(before.get(k), dict):
            changed = [i for i in now[k] if before[k].get(i) != now[k][i]]
            out.append(f"inputs: its content changed ({', '.join(changed)})")
        elif k == "inputs":  # recorded by a version without fingerprints
            out.append("inputs: its content changed")
        else:
            out.append(f"{k}: {before.get(k)!r} -> {now.get(k)!r}")
    return "; ".join(out)


def run_arm(spec: str, seed: int, out: str, gpus: int, passthrough: list[str], stop_ok: bool = False) -> dict:
    """Train one arm (or reuse / continue it); returns {name, dir, status: reused | trained | continued}. A finished
    arm is reused only when its command and the content of its inputs (input_fingerprints) are unchanged.
    ``stop_ok`` (a SLURM array task): an arm that stopped on request (USR1 before the time limit: status
    interrupted, checkpoint written) returns status interrupted instead of failing, so the task can requeue."""
    name = arm_name(spec, seed)
    arm_dir = os.path.join(out, "arms", name)
    settings = {"region": spec, "seed": seed, "gpus": gpus, "flags": passthrough,
                "inputs": input_fingerprints(passthrough, spec)}
    marker = os.path.join(arm_dir, ARM_FILE)
    run_json = os.path.join(arm_dir, "run.json")
    status = "trained"
    if os.path.isfile(marker):
        with open(marker) as f:
            before = json.load(f)
        if before != settings:
            raise CompareError(f"arm {arm_dir} was started with other settings or inputs "
                               f"({_differences(before, settings)}); use another --output-dir, or move that arm away "
                               "to train it again")
        if _status(run_json) == "complete":
            log.info("arm %s: reused (finished with the same command and inputs; %s)", name, run_json)
            return {"name": name, "dir": arm_dir, "status": "reused"}
        status = "continued"
    elif os.path.exists(arm_dir) and os.listdir(arm_dir):
        raise CompareError(f"{arm_dir} exists and was not written by launch/compare.py ({ARM_FILE} missing); use "
                           "another --output-dir")
    os.makedirs(arm_dir, exist_ok=True)
    with open(marker, "w") as f:
        json.dump(settings, f, indent=1)
    # An unfinished arm continues from its checkpoint; one that kept none (no --save-every) starts again, its files
    # set aside by --overwrite (a --resume auto there is refused rather than silently starting over).
    again = ["--resume", "auto"] if checkpoint.find_latest(arm_dir) is not None else ["--overwrite"]
    cmd = arm_command(spec, seed, arm_dir, gpus, passthrough) + (again if status == "continued" else [])
    log.info("arm %s: %s", name, " ".join(cmd))
    res = subprocess.run(cmd)  # in our working directory: relative paths (--data, @FILE, the demo) mean the same
    if res.returncode != 0:
        raise CompareError(f"arm {name} failed (exit {res.returncode}); its log is above. Run the same command "
                           "again to continue it and the arms after it")
    if stop_ok and _status(run_json) == "interrupted":
        return {"name": name, "dir": arm_dir, "status": "interrupted"}
    if _status(run_json) != "complete":
        raise CompareError(f"arm {name} stopped before its end ({run_json}); run the same command again to "
                           "continue it")
    return {"name": name, "dir": arm_dir, "status": status}


def _status(run_json: str) -> str | None:
    """run.json's status (complete, interrupted, ...), None when there is none."""
    if not os.path.isfile(run_json):
        return None
    with open(run_json) as f:
        return json.load(f).get("status")


def arms_config(passthrough: list[str]):
    """The arms' run config as launch/sft.py resolves it (template, image aspect, length limit): the start model is
    evaluated with these, not with its own stage-1 settings."""
    from ..train.cli import parse

    return parse("sft", "", [*passthrough, "--output-dir", "arm"]).resolve()


def baseline_record(passthrough: list[str]) -> dict | None:
    """What the start model's evaluation is made from (recorded in OUTPUT_DIR/stage1/inputs.json): the model (--init,
    else --model, else the demo's), the held-out and text-retention data, the arms' template, image aspect handling,
    length limit and image folder, and the content fingerprints of the model and the data. None without
    text-retention data."""
    init = (_flag(passthrough, "--init") or _flag(passthrough, "--model")
            or os.path.join(DEMO_DIR, "base_model"))
    demo_data = _flag(passthrough, "--data") is None
    text = _flag(passthrough, "--text-eval-data") or (os.path.join(DEMO_DIR, TEXT_EVAL) if demo_data else None)
    held_out = _flag(passthrough, "--eval-data") or (os.path.join(DEMO_DIR, "sft_eval.json") if demo_data else None)
    if text is None or held_out is None:
        return None
    arms = arms_config(passthrough)
    return {"model": os.path.abspath(init), "data": os.path.abspath(held_out), "text_data": os.path.abspath(text),
            "template": arms.template, "image_aspect_ratio": arms.image_aspect_ratio, "max_length": arms.max_length,
            "image_folder": arms.image_folder and os.path.abspath(arms.image_folder),
            "inputs": {"model": fingerprint(init), "data": fingerprint(held_out), "text_data": fingerprint(text)}}


def stage1_baseline(out: str, passthrough: list[str]) -> dict | None:
    """Where stage 2 starts, evaluated as the arms are (baseline_record: their held-out and text-retention data,
    template, image aspect handling and length limit, not the stage-1 run's own), so a region's text retention shows
    what it forgot. None without text-retention data. Reused when OUTPUT_DIR/stage1/inputs.json records the same
    settings and input contents; a stale evaluation is moved to stage1/abandoned/N/, never deleted."""
    want = baseline_record(passthrough)
    if want is None:
        return None
    eval_dir = os.path.join(out, "stage1")
    result, recorded = os.path.join(eval_dir, "eval.json"), os.path.join(eval_dir, "inputs.json")
    if os.path.isfile(result) and os.path.isfile(recorded):
        with open(recorded) as f:
            if json.load(f) == want:
                with open(result) as g:
                    return json.load(g)
    set_aside_stale(eval_dir)
    cmd = [sys.executable, str(EVALUATE), "--model", want["model"], "--data", want["data"], "--text-eval-data",
           want["text_data"], "--output-dir", eval_dir]
    cmd += [a for k in ("template", "image_aspect_ratio", "max_length") for a in (flag(k), str(want[k]))]
    for name in ("--image-folder", "--max-new-tokens", "--precision", "--eval-max-samples", "--num-workers",
                 "--allow-outside-images"):
        if name == "--allow-outside-images" and name in passthrough:
            cmd.append(name)
        elif _flag(passthrough, name) is not None:
            cmd += [name, _flag(passthrough, name)]
    log.info("the model stage 2 starts from, evaluated as the arms are: %s", " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise CompareError(f"evaluating {want['model']} (where stage 2 starts) failed; its log is above")
    outputs.write_json_atomic(recorded, want)
    with open(result) as f:
        return json.load(f)


def set_aside_stale(eval_dir: str) -> None:
    """Move an earlier baseline evaluation (eval.json, eval.md, inputs.json) to eval_dir/abandoned/N/."""
    dest = outputs.set_aside_files(eval_dir, ["eval.json", "eval.md", "inputs.json"])
    if dest is not None:
        log.info("the start model's earlier evaluation was made with other settings or inputs: moved to %s", dest)


def finished_arm(spec: str, seed: int, out: str, passthrough: list[str]) -> dict:
    """An arm a separate job trained (SLURM array task): it must be complete with this command (ranks aside)."""
    name = arm_name(spec, seed)
    arm_dir = os.path.join(out, "arms", name)
    marker = os.path.join(arm_dir, ARM_FILE)
    if not os.path.isfile(marker) or _status(os.path.join(arm_dir, "run.json")) != "complete":
        raise CompareError(f"arm {name} has not finished ({arm_dir}); run its array task again (or launch/compare.py "
                           "without --report-only, which trains what is missing)")
    with open(marker) as f:
        before = json.load(f)
    now = {"region": spec, "seed": seed, "flags": passthrough, "inputs": input_fingerprints(passthrough, spec)}
    if {k: before.get(k) for k in now} != now:
        raise CompareError(f"arm {arm_dir} was trained with other settings or inputs "
                           f"({_differences({k: before.get(k) for k in now}, now)}); report with the flags and files "
                           "it was trained with")
    return {"name": name, "dir": arm_dir, "status": "reused"}


def compare(specs: list[str], seeds: list[int], out: str, gpus: int, passthrough: list[str], arm: int | None = None,
            report_only: bool = False) -> dict:
    """Every arm, then the report (report.{json,md,html,csv} in ``out``); returns the report's data.
    ``arm``: train only that arm (its index in regions x seeds order: an array task) and write no report;
    ``report_only``: train nothing, report arms that other jobs finished."""
    check_specs(specs, passthrough)
    pairs = [(spec, seed) for spec in specs for seed in seeds]
    if arm is not None:
        if not 0 <= arm < len(pairs):
            raise CompareError(f"--arm {arm}: there are {len(pairs)} arms (0..{len(pairs) - 1}), regions x seeds")
        return {"arms": [run_arm(*pairs[arm], out, gpus, passthrough, stop_ok=True)]}
    if report_only:
        arms = [finished_arm(spec, seed, out, passthrough) for spec, seed in pairs]
    else:
        arms = [run_arm(spec, seed, out, gpus, passthrough) for spec, seed in pairs]
    stage1 = stage1_baseline(out, passthrough)
    rep = report.build([a["dir"] for a in arms], baseline=None)
    rep["regions"] = report.by_region(rep["runs"])
    rep["stage1"] = None if stage1 is None else {
        "model": stage1["model"], "accuracy": stage1["accuracy"], "text_retention": stage1["text_eval"]["accuracy"],
        "accuracy_by_category": report.category_accuracy(stage1)}
    rep["arms"] = arms
    report.write(rep, out)
    return rep
