"""launch/compare.py on the demo: one arm per region, a report row per region that matches its runs, an interrupted
arm continued and finished arms reused on a rerun, and bad specs refused before any arm starts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run
from lvlm_region.train.checkpoint import STOP_FILE
from lvlm_region.tools import compare
from lvlm_region.tools.compare import ARM_FILE, CompareError, split_regions, stage1_baseline
from lvlm_region.tools.report import by_region

ARM_FLAGS = ["--max-steps", "3", "--micro-batch", "4", "--num-workers", "0", "--allow-outside-images"]


@pytest.fixture
def small_demo(demo_dir, tmp_path):
    """48 training and 6 held-out samples of the demo (each arm prepares its data: keep that short), the images
    reached through a link (hence --allow-outside-images)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "images").symlink_to((demo_dir / "images").resolve())
    for name, n in (("sft_train.json", 48), ("sft_eval.json", 6), ("text_eval.json", 6)):
        (d / name).write_text(json.dumps(json.loads((demo_dir / name).read_text())[:n]))
    return ["--data", str(d / "sft_train.json"), "--eval-data", str(d / "sft_eval.json"), "--text-eval-data",
            str(d / "text_eval.json")]


def test_split_regions_keeps_layer_lists_together():
    assert split_regions("full, uniform25,layers:1,5,9,first:2") == ["full", "uniform25", "layers:1,5,9", "first:2"]
    assert split_regions("layers:0,7+lm_head,last25") == ["layers:0,7+lm_head", "last25"]
    with pytest.raises(CompareError, match="names a region twice"):
        split_regions("full,full")


def test_by_region_means_spreads_and_ratios_by_hand():
    rows = [{"name": n, "region": reg, "seed": s, "trainable_params": p, "accuracy": a, "eval_loss": loss,
             "step_seconds": t, "gpu_hours": h, "text_retention": a / 2, "accuracy_by_category": {"color": a}}
            for n, reg, s, p, a, loss, t, h in [("f1", "full", 1, 100, 0.9, 1.0, 2.0, 4.0),
                                                 ("f2", "full", 2, 100, 0.7, 1.2, 2.0, 4.0),
                                                 ("u1", "uniform25", 1, 30, 0.6, 1.5, 1.5, 3.0),
                                                 ("u2", "uniform25", 2, 30, 0.8, 1.3, 1.5, 3.0)]]
    full, u25 = by_region(rows)
    assert full["region"] == "full" and full["accuracy"] == pytest.approx(0.8)
    assert full["accuracy_std"] == pytest.approx(0.1414213, rel=1e-5) and full["accuracy_vs_full"] == 1.0
    assert u25["accuracy"] == pytest.approx(0.7) and u25["accuracy_vs_full"] == pytest.approx(0.875)
    assert u25["gpu_hours_vs_full"] == pytest.approx(0.75) and u25["step_time_vs_full"] == pytest.approx(0.75)
    assert (u25["seeds"], u25["runs"], u25["trainable_params"]) == ([1, 2], ["u1", "u2"], 30)
    assert u25["eval_loss"] == pytest.approx(1.4) and (u25["accuracy_min"], u25["accuracy_max"]) == (0.6, 0.8)
    assert u25["text_retention"] == pytest.approx(0.35) and u25["accuracy_by_category"] == {"color": pytest.approx(0.7)}


def interrupt_second_arm(cmd: list[str], arm_dir: Path, log: Path) -> int:
    """Run the comparison and ask its second arm to stop (the STOP file a SLURM preemption writes) as soon as
    compare has set that arm up; returns the exit status."""
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                                                start_new_session=True) as proc:
        deadline = time.time() + 600
        while not (arm_dir / ARM_FILE).exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        (arm_dir / STOP_FILE).touch()  # before its first step: the arm still prepares its data and loads the model
        try:
            return proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def test_two_regions_interrupted_continued_then_reused(small_demo, tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "launch/compare.py", "--regions", "full,uniform25", "--output-dir", str(out), *small_demo,
           *ARM_FLAGS]
    u25 = out / "arms" / "uniform25-seed0"
    code = interrupt_second_arm(cmd, u25, tmp_path / "first.log")
    first = (tmp_path / "first.log").read_text()
    assert code == 2 and f"arm uniform25-seed0 stopped before its end ({u25 / 'run.json'})" in first, first[-3000:]
    stopped = json.loads((u25 / "run.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["steps_done"] < 3 and not (out / "report.json").exists()

    res = run(cmd, timeout=900)  # the same command again: full reused, uniform25 continued from its checkpoint
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert res.stdout.count("reused (finished with the same command") == 1
    assert f"resumed from {u25 / 'checkpoints'}" in res.stdout + res.stderr
    assert [a["status"] for a in json.loads((out / "report.json").read_text())["arms"]] == ["reused", "continued"]
    rep = json.loads((out / "report.json").read_text())
    assert [g["region"] for g in rep["regions"]] == ["full", "uniform25"]
    for g in rep["regions"]:
        arm = json.loads((out / "arms" / f"{g['region']}-seed0" / "run.json").read_text())
        assert g["accuracy"] == arm["eval"]["accuracy"] and g["eval_loss"] == arm["eval"]["loss"]
        assert g["trainable_params"] == arm["parameters"]["all"]["trainable"]
        assert g["gpu_hours"] == pytest.approx(arm["time"]["gpu_seconds"] / 3600)
        assert arm["region"]["spec"] == g["region"] and arm["steps_done"] == 3 and arm["eval"]["samples"] == 6
        assert g["text_retention"] == arm["text_eval"]["accuracy"] and arm["text_eval"]["samples"] == 6
        assert g["accuracy_by_category"] == {k: v["accuracy"] for k, v in arm["eval"]["by_category"].items()}
        assert sorted(g["accuracy_by_category"]) == ["color", "position", "shape"]
    full, u25 = rep["regions"]
    assert full["accuracy_vs_full"] in (1.0, None) and u25["trainable_params"] < full["trainable_params"]
    assert u25["gpu_hours_vs_full"] == pytest.approx(u25["gpu_hours"] / full["gpu_hours"])
    for name in ("report.md", "report.html", "report.csv", "accuracy_vs_gpu_hours.png", "loss_curves.png"):
        assert (out / name).is_file()
    md = (out / "report.md").read_text()
    assert "## Regions (mean over seeds; relative to region full)" in md
    # Where the arms start (no --init: the base model), evaluated as the arms are: its text retention is the LLM's.
    start = json.loads((out / "stage1" / "eval.json").read_text())
    assert start["model"] == os.path.abspath("data/demo/base_model") and start["text_eval"]["samples"] == 6
    assert rep["stage1"]["text_retention"] == start["text_eval"]["accuracy"]
    assert f"text retention {start['text_eval']['accuracy']:.3f}" in md

    stamps = {p: os.stat(out / "arms" / p / "run.json").st_mtime_ns for p in ("full-seed0", "uniform25-seed0")}
    res = run(cmd, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert res.stdout.count("reused (finished with the same command") == 2
    assert "evaluated as the arms are" not in res.stdout  # the start's evaluation is reused too
    assert stamps == {p: os.stat(out / "arms" / p / "run.json").st_mtime_ns for p in stamps}  # not retrained
    assert [a["status"] for a in json.loads((out / "report.json").read_text())["arms"]] == ["reused", "reused"]

    res = run([*cmd[:-len(ARM_FLAGS)], "--max-steps", "4"], timeout=300)  # same arms, another command: refused
    assert res.returncode == 2 and "was started with other settings" in res.stderr
    # the same command, but the training data edited behind the same path: not reused (it was, by flag text alone)
    train = Path(small_demo[1])
    train.write_text(json.dumps(json.loads(train.read_text())[:40]))
    res = run(cmd, timeout=300)
    assert res.returncode == 2 and "was started with other settings or inputs (inputs: its content changed (--data))" \
        in res.stderr, res.stderr[-2000:]
    assert stamps == {p: os.stat(out / "arms" / p / "run.json").st_mtime_ns for p in stamps}


def test_start_evaluation_reused_only_for_the_same_settings_and_contents(demo_dir, tmp_path, caplog):
    """OUTPUT_DIR/stage1/eval.json answers for the model the arms start from only when stage1/inputs.json records the
    same model, held-out data, text data, template, image handling and the same file contents (a retrained --init or
    edited data behind the same path is not reused); any other one is set aside and evaluated again (here: a model
    without weights, so the new evaluation fails, which shows it was attempted instead of the stale result returned).
    It is evaluated with the arms' settings, not with the stage-1 run's own (its image aspect was square)."""
    import shutil
    init = tmp_path / "stage1_run"
    init.mkdir()
    shutil.copy(demo_dir / "base_model" / "config.json", init / "config.json")
    (init / "run.json").write_text(json.dumps({"config": {"template": "plain", "image_aspect_ratio": "square",
                                                          "max_length": 512}}))
    held, text = tmp_path / "held.json", tmp_path / "text.json"
    held.write_text("[1]")
    text.write_text("[2]")
    flags = ["--init", str(init), "--eval-data", str(held), "--text-eval-data", str(text), "--data", "train.json"]
    out = tmp_path / "cmp"
    (out / "stage1").mkdir(parents=True)
    before = {"model": str(init), "accuracy": 0.5, "text_eval": {"accuracy": 1.0}}
    record = compare.baseline_record(flags)
    assert (record["template"], record["image_aspect_ratio"], record["max_length"]) == ("auto", "pad", 2048)
    (out / "stage1" / "eval.json").write_text(json.dumps(before))
    (out / "stage1" / "inputs.json").write_text(json.dumps(record))
    changes = [lambda: held.write_text("[3]"),  # edited behind the same path
               lambda: (init / "projector.safetensors").write_bytes(b"retrained"),
               lambda: flags.extend(["--template", "vicuna_v1"])]
    for i, change in enumerate(changes, start=1):
        assert stage1_baseline(str(out), flags) == before  # the same settings and contents: reused
        change()
        with caplog.at_level("INFO"), pytest.raises(CompareError, match="where stage 2 starts\\) failed"):
            stage1_baseline(str(out), flags)
        assert "--image-aspect-ratio pad --max-length 2048" in caplog.text  # the arms' settings, not stage 1's
        caplog.clear()
        kept = out / "stage1" / "abandoned" / "1"  # the stale result: moved aside once, never deleted
        assert json.loads((kept / "eval.json").read_text()) == before
        assert (out / "stage1" / "abandoned" / str(i)).is_dir()
        record = compare.baseline_record(flags)  # as if that evaluation had succeeded
        (out / "stage1" / "eval.json").write_text(json.dumps(before))
        (out / "stage1" / "inputs.json").write_text(json.dumps(record))


@pytest.mark.parametrize("regions,flags,message", [
    ("full,layers:1,99", [], "--regions: invalid region spec 'layers:1,99': layer index 99 is out of range 0..7"),
    ("full,paper32", [], "paper32 is defined for 32-layer LLMs only"),
    ("full", ["--seed", "3"], "--seed: launch/compare.py sets these per arm"),
    ("full,uniform25", ["--arm", "2"], "--arm 2: there are 2 arms (0..1), regions x seeds"),
    ("full", ["--report-only"], "arm full-seed0 has not finished"),
])
def test_bad_comparisons_fail_before_any_arm(demo_dir, tmp_path, regions, flags, message):
    res = run([sys.executable, "launch/compare.py", "--regions", regions, "--output-dir", str(tmp_path / "c"),
               *flags], timeout=300)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "c" / "arms").exists()
