"""The region comparison (launch/compare.py): stage 2 once per region and seed from the same stage-1 projector,
data, schedule and batch, each arm its own DeepSpeed launch of launch/sft.py; then one report with a row per
region (report.by_region) through the cost report generator.

Each arm lives in OUTPUT_DIR/arms/<region>-seed<S>/ with the command it was started with (compare.json). Run
again, a finished arm with the same command is reused, an unfinished one continues (--resume auto), one started
with another command is refused. Every spec is resolved against the model before any arm starts.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from transformers import AutoConfig

from . import demo, regions, report
from .config import DEMO_DIR, TEXT_EVAL
from .families import find_parts
from .model import num_decoder_layers, skeleton

log = logging.getLogger(__name__)

SFT = Path(__file__).resolve().parents[1] / "launch" / "sft.py"
EVALUATE = SFT.parent / "evaluate.py"
OWNED = ("--region", "--seed", "--output-dir", "--resume", "--overwrite")  # flags compare sets per arm
ARM_FILE = "compare.json"


class CompareError(ValueError):
    """A comparison that cannot run as asked, with what to change."""


def split_regions(text: str) -> list[str]:
    """``full,uniform25,layers:1,5,9`` -> ['full', 'uniform25', 'layers:1,5,9']: a bare number continues the
    ``layers:`` list before it (specs are otherwise comma-free)."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if specs and re.fullmatch(r"\d+([+-]\w+)*", part) and specs[-1].startswith("layers:"):
            specs[-1] += "," + part
        elif part:
            specs.append(part)
    if not specs:
        raise CompareError("--regions is empty; give e.g. full,uniform25,first25,last25,middle25")
    if len(set(specs)) != len(specs):
        raise CompareError(f"--regions names a region twice: {specs}")
    return specs


def check_specs(specs: list[str], passthrough: list[str]) -> int:
    """Resolve every spec against the model (its config only; the demo's is built first if needed), before any arm
    starts; returns the model's depth."""
    owned = sorted({a.split("=")[0] for a in passthrough if a.split("=")[0] in OWNED})
    if owned:
        raise CompareError(f"{', '.join(owned)}: launch/compare.py sets these per arm (--regions, --seeds, "
                           "--output-dir); leave them out")
    if "--llm" in passthrough:
        raise CompareError("--llm/--vision: assemble the model once (launch/pretrain.py) and compare with --model "
                           "OUTPUT_DIR/base_model and --init OUTPUT_DIR")
    model = _flag(passthrough, "--model")
    if model is None:
        model = os.path.join(demo.ensure(DEMO_DIR), "base_model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise CompareError(f"--model {model}: no config.json; give a local transformers checkpoint dir")
    config = AutoConfig.from_pretrained(model)
    depth = num_decoder_layers(config)
    tied = find_parts(skeleton(config)).tied
    for spec in specs:
        try:
            regions.resolve(spec, depth, tied=tied)
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


def arm_name(spec: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_") + f"-seed{seed}"


def arm_command(spec: str, seed: int, arm_dir: str, gpus: int, passthrough: list[str]) -> list[str]:
    with socket.socket() as s:  # a free port per launch: arms run one after another, never sharing one
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus), "--master_port", port,
            str(SFT), "--region", spec, "--seed", str(seed), "--output-dir", arm_dir, *passthrough]


def run_arm(spec: str, seed: int, out: str, gpus: int, passthrough: list[str]) -> dict:
    """Train one arm (or reuse / continue it); returns {name, dir, status: reused | trained | continued}."""
    name = arm_name(spec, seed)
    arm_dir = os.path.join(out, "arms", name)
    settings = {"region": spec, "seed": seed, "gpus": gpus, "flags": passthrough}
    marker = os.path.join(arm_dir, ARM_FILE)
    run_json = os.path.join(arm_dir, "run.json")
    status = "trained"
    if os.path.isfile(marker):
        with open(marker) as f:
            before = json.load(f)
        if before != settings:
            raise CompareError(f"arm {arm_dir} was started with other settings ({before}, now {settings}); use "
                               "another --output-dir, or move that arm away to train it again")
        if _status(run_json) == "complete":
            log.info("arm %s: reused (finished with the same command; %s)", name, run_json)
            return {"name": name, "dir": arm_dir, "status": "reused"}
        status = "continued"
    elif os.path.exists(arm_dir) and os.listdir(arm_dir):
        raise CompareError(f"{arm_dir} exists and was not written by launch/compare.py ({ARM_FILE} missing); use "
                           "another --output-dir")
    os.makedirs(arm_dir, exist_ok=True)
    with open(marker, "w") as f:
        json.dump(settings, f, indent=1)
    cmd = arm_command(spec, seed, arm_dir, gpus, passthrough) + (["--resume", "auto"] if status == "continued" else [])
    log.info("arm %s: %s", name, " ".join(cmd))
    res = subprocess.run(cmd)  # in our working directory: relative paths (--data, @FILE, the demo) mean the same
    if res.returncode != 0:
        raise CompareError(f"arm {name} failed (exit {res.returncode}); its log is above. Run the same command "
                           "again to continue it and the arms after it")
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


def stage1_baseline(out: str, passthrough: list[str]) -> dict | None:
    """Where stage 2 starts (the --init stage-1 model, else the base model), evaluated as the arms are (their
    held-out and text-retention data, their template), so a region's text retention shows what it forgot. None
    without text-retention data. Reused when OUTPUT_DIR/stage1/eval.json exists for the same model, data, text data
    and template."""
    init = (_flag(passthrough, "--init") or _flag(passthrough, "--model")
            or os.path.join(DEMO_DIR, "base_model"))
    demo_data = _flag(passthrough, "--data") is None
    text = _flag(passthrough, "--text-eval-data") or (os.path.join(DEMO_DIR, TEXT_EVAL) if demo_data else None)
    held_out = _flag(passthrough, "--eval-data") or (os.path.join(DEMO_DIR, "sft_eval.json") if demo_data else None)
    if text is None or held_out is None:
        return None
    template = _flag(passthrough, "--template") or "auto"
    eval_dir = os.path.join(out, "stage1")
    result = os.path.join(eval_dir, "eval.json")
    if os.path.isfile(result):
        with open(result) as f:
            before = json.load(f)
        same = (os.path.abspath(init), os.path.abspath(held_out), os.path.abspath(text), template)
        if (before["model"], before["data"], before["text_data"], before["template"]) == same:
            return before
    cmd = [sys.executable, str(EVALUATE), "--model", init, "--data", held_out, "--text-eval-data", text,
           "--template", template, "--output-dir", eval_dir]
    for name in ("--image-folder", "--max-length", "--image-aspect-ratio", "--max-new-tokens", "--precision",
                 "--eval-max-samples", "--num-workers", "--allow-outside-images"):
        if name == "--allow-outside-images" and name in passthrough:
            cmd.append(name)
        elif _flag(passthrough, name) is not None:
            cmd += [name, _flag(passthrough, name)]
    log.info("the model stage 2 starts from, evaluated as the arms are: %s", " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise CompareError(f"evaluating {init} (where stage 2 starts) failed; its log is above")
    with open(result) as f:
        return json.load(f)


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
    if (before["region"], before["seed"], before["flags"]) != (spec, seed, passthrough):
        raise CompareError(f"arm {arm_dir} was trained with other settings ({before}); report with the flags it "
                           "was trained with")
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
        return {"arms": [run_arm(*pairs[arm], out, gpus, passthrough)]}
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
