"""A rerun, a resubmit or a second look never destroys or misreports a result (issue 30): resubmitting a finished
run, reusing an output path, evaluating a model twice, duplicated arms, abbreviated flags, and the settings a resume
must keep. Each test fails on the code before the fix: it checks files byte for byte and the messages' words."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, run
from lvlm_region.train import checkpoint, cli, engine
from lvlm_region.tools import compare
from lvlm_region import config
from lvlm_region.data import prepare
from lvlm_region.model import regions
from lvlm_region.config import RESUME_MAY_CHANGE, RunConfig
from lvlm_region.train.trainer import run_identity

SHORT = ["--micro-batch", "4", "--num-workers", "0", "--eval-max-samples", "2", "--max-steps", "4"]


def snapshot(root: Path) -> dict:
    """Every file under ``root``: its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def sft(out: Path, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "launch/sft.py", "--output-dir", str(out), *flags], timeout=timeout)


def test_resubmitting_a_finished_run_touches_nothing_and_an_unfinished_one_is_not_started_over(demo_sft_data,
                                                                                             tmp_path):
    out = tmp_path / "run"
    flags = [*demo_sft_data, *SHORT, "--log-every", "2"]
    res = sft(out, *flags)  # the default --save-every 0: no checkpoint is kept
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    first = json.loads((out / "run.json").read_text())
    assert first["status"] == "complete" and checkpoint.find_latest(str(out)) is None
    before = snapshot(out)
    # A requeued SLURM job (every sbatch script adds --resume auto): nothing to do, nothing touched.
    res = sft(out, *flags, "--resume", "auto")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{out}: already complete, nothing to do (run.json status complete, 4 steps)" in res.stdout
    assert "Loading weights" not in res.stdout + res.stderr and snapshot(out) == before
    # The same folder with other settings (a typo in --output-dir naming another finished run): refused, named.
    res = sft(out, *flags[:-2], "--log-every", "2", "--max-steps", "3", "--resume", "auto")
    assert res.returncode == 2 and f"--output-dir {out} holds a complete run with other settings" in res.stderr
    assert "--max-steps: that run 4, now 3" in res.stderr and snapshot(out) == before
    # An unfinished run that kept no checkpoint (killed before its end): not started over, not overwritten.
    (out / "run.json").write_text(json.dumps({**first, "status": "running"}))
    before = snapshot(out)
    res = sft(out, *flags, "--resume", "auto")
    assert res.returncode == 2 and "holds an unfinished run (run.json status running" in res.stderr
    assert "and no checkpoint to continue it from" in res.stderr and "Pass --overwrite" in res.stderr
    assert snapshot(out) == before
    # --overwrite starts it again; the old run's files are moved aside, byte for byte, never deleted.
    res = sft(out, *flags[:-2], "--log-every", "1", "--resume", "auto", "--overwrite")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    aside = out / "abandoned" / "run-1"
    for name in ("run.json", "metrics.jsonl", "model.safetensors", "config.json", ".export.json"):
        assert (aside / name).read_bytes() == before[name][0], name
    # final_loss_mean: the mean loss over the last logged window. The rerun logs every step (same seed, same losses):
    # the first run's window (steps 3-4, logged every 2) is the mean of the rerun's steps 3 and 4.
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    assert first["final_loss"] == losses[4]
    assert first["final_loss_mean"] == {"value": pytest.approx((losses[3] + losses[4]) / 2), "first_step": 3,
                                        "last_step": 4, "steps": 2}
    assert json.loads((out / "run.json").read_text())["final_loss_mean"]["value"] == losses[4]


def test_every_run_config_field_is_in_the_resume_identity_or_listed_as_safe_to_change(demo_dir):
    """A new RunConfig field must be decided on: part of what a resume must match, or safe to change (with why)."""
    cfg = RunConfig(stage="sft", output_dir="out").resolve()
    setup = SimpleNamespace(region=regions.resolve("uniform25", 8), ds_config=engine.build_ds_config(
        2, None, 4, 1, 1.0, "fp32", False), precision="fp32")
    ident = run_identity(cfg, setup, 10, 100)
    derived = {"sampling": ("group_by_length", "packing"), "tuner": ("tuner", "lora_r", "lora_alpha", "lora_dropout"),
               "zero_stage": ("zero",)}
    covered = set(ident) | {f for fields in derived.values() for f in fields}
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert not set(RESUME_MAY_CHANGE) & covered
    assert fields - set(RESUME_MAY_CHANGE) - covered == set(), "decide: identity or RESUME_MAY_CHANGE"
    for name in ("warmup_ratio", "grad_clip", "weight_decay", "offload", "template", "image_aspect_ratio",
                 "image_folder", "max_length"):
        assert name in ident, name
    assert set(RESUME_MAY_CHANGE) <= fields  # no stale names


def test_a_resume_with_another_schedule_or_data_setting_is_refused(demo_sft_data, tmp_path):
    """--warmup-ratio, --grad-clip and --weight-decay were not compared before: the resumed run silently changed."""
    out = tmp_path / "run"
    stop = ["--save-every", "2", "--max-steps", "2"]
    res = sft(out, *demo_sft_data, *SHORT, *stop)
    assert res.returncode == 0, res.stderr[-2000:]
    (out / "run.json").write_text(json.dumps({**json.loads((out / "run.json").read_text()), "status": "interrupted"}))
    res = sft(out, *demo_sft_data, *SHORT, "--save-every", "2", "--resume", "auto", "--warmup-ratio", "0.2",
              "--grad-clip", "0.5", "--weight-decay", "0.1")
    assert res.returncode == 2
    for line in ("warmup_ratio: checkpoint 0.03, now 0.2 (the LR schedule (its warm-up) depends on it)",
                 "grad_clip: checkpoint 1.0, now 0.5 (every optimizer step depends on it)",
                 "weight_decay: checkpoint 0.0, now 0.1"):
        assert line in res.stderr, res.stderr[-3000:]
    assert "total_steps: checkpoint 2, now 4" in res.stderr  # and the step count, as before


def test_an_abbreviated_flag_is_refused_everywhere(demo_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.parse("sft", "", ["--regio", "first25", "--output-dir", "o"])
    assert "unrecognized arguments: --regio" in capsys.readouterr().err
    # compare: a flag for the arms that launch/sft.py does not have, abbreviated or not, fails before any arm
    for bad in (["--regio", "first25"], ["--output-d", "x"], ["--max-step", "3"]):
        res = run([sys.executable, "launch/compare.py", "--regions", "full,uniform25", "--output-dir",
                   str(tmp_path / "c"), *bad], timeout=120)
        assert res.returncode == 2 and f"launch/sft.py has no flag {bad[0]}" in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "c").exists()
    for script, required in (("launch/evaluate.py", []), ("launch/importance.py", []),
                             ("launch/prune.py", ["--model", "m", "--drop", "1", "--output", "o"]),
                             ("launch/plan.py", ["--model", "m"]), ("launch/report.py", ["r", "--output", "o"]),
                             ("data_prep/prepare.py", ["--data", "d", "--model", "m", "--output", "o"])):
        res = run([sys.executable, script, *required, "--mode", "x"], timeout=120)  # --model, --method ...
        assert res.returncode == 2 and "unrecognized arguments: --mode" in res.stderr, (script, res.stderr[-500:])


@pytest.mark.parametrize("seeds,message", [
    (",", "--seeds ',' names no seed"),
    ("0,0", "--seeds '0,0' names seed 0 twice"),
    ("1,x", "--seeds must be a whole number"),
])
def test_seeds_that_name_no_seed_or_one_twice_are_refused(seeds, message):
    with pytest.raises(ValueError, match=message):
        compare.parse_seeds(seeds)


def test_two_specs_that_would_share_an_arm_folder_are_refused(tmp_path):
    assert compare.arm_name("uniform25+vision", 0) != compare.arm_name("uniform25-vision", 0)
    assert compare.arm_name("uniform25", 1) == "uniform25-seed1"
    with pytest.raises(compare.CompareError, match="would share the arm folder top25_a_b.json"):
        compare.check_specs(["top25@a/b.json", "top25@a_b.json"], [])
    res = run([sys.executable, "launch/compare.py", "--regions", "full", "--seeds", "0,0", "--output-dir",
               str(tmp_path / "c")], timeout=120)
    assert res.returncode == 2 and "names seed 0 twice" in res.stderr and not (tmp_path / "c").exists()


def test_a_bad_region_is_refused_before_the_demo_is_generated(tmp_path):
    """On a fresh checkout (no data/demo), an invalid spec waited minutes for the demo to be generated."""
    for spec, problem in (("uniform150", "percentage 150 is outside (0, 100]"),
                          ("bogus7", "unknown layer selection 'bogus7'"), ("uniform0", "percentage 0 is outside")):
        res = subprocess.run([sys.executable, str(ROOT / "launch" / "sft.py"), "--region", spec, "--output-dir", "o"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and f"invalid region spec '{spec}': {problem}" in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "data").exists() and not (tmp_path / "o").exists()
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "compare.py"), "--regions", "full,uniform150",
                          "--output-dir", "c"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "percentage 150 is outside" in res.stderr and not (tmp_path / "data").exists()


def test_a_prepared_set_that_allows_outside_images_needs_the_flag(demo_dir, tmp_path):
    sample = json.loads((demo_dir / "sft_eval.json").read_text())[:2]
    (tmp_path / "d.json").write_text(json.dumps(sample))
    enc, tokenizer, _ = prepare.for_model(str(demo_dir / "base_model"), "auto", 2048, allow_outside_images=True)
    prepare.prepare(str(tmp_path / "d.json"), str(demo_dir), enc, tokenizer, str(tmp_path / "prep"))
    meta = prepare.read_meta(str(tmp_path / "prep"))
    prepare.check_matches(meta, "prep", enc, tokenizer)  # with the flag: accepted
    strict, _, _ = prepare.for_model(str(demo_dir / "base_model"), "auto", 2048)
    with pytest.raises(ValueError, match="was prepared with --allow-outside-images.*pass --allow-outside-images"):
        prepare.check_matches(meta, "prep", strict, tokenizer)


def test_held_out_images_resolve_against_image_folder_in_training_and_in_evaluate(demo_dir, demo_sft_data, tmp_path):
    """One rule: --image-folder is the root of --eval-data's image paths too. Before, the end-of-run evaluation looked
    beside the eval file and dropped every sample as missing."""
    held = tmp_path / "elsewhere" / "eval.json"
    held.parent.mkdir()
    held.write_text(json.dumps(json.loads((demo_dir / "sft_eval.json").read_text())[:4]))
    out = tmp_path / "run"
    res = sft(out, "--data", demo_sft_data[1], "--eval-data", str(held), "--image-folder", str(demo_dir),
              "--micro-batch", "4", "--num-workers", "0", "--max-steps", "1")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    at_end = json.loads((out / "run.json").read_text())["eval"]
    assert at_end["samples"] == 4
    res = run([sys.executable, "launch/evaluate.py", "--model", str(out), "--data", str(held), "--image-folder",
               str(demo_dir), "--num-workers", "0", "--output-dir", str(tmp_path / "ev")], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    alone = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert (alone["samples"], alone["correct"]) == (at_end["samples"], at_end["correct"])
    res = sft(tmp_path / "r2", "--data", demo_sft_data[1], "--image-folder", str(tmp_path / "no" / "such"))
    assert res.returncode == 2 and f"--image-folder {tmp_path / 'no' / 'such'} is not a directory" in res.stderr


def test_a_second_evaluation_or_scoring_never_replaces_a_file_it_did_not_write(sft_uniform25, demo_dir, tmp_path):
    ev = tmp_path / "ev"
    ev.mkdir()
    earlier = {"model": str(sft_uniform25.resolve()), "data": str((demo_dir / "sft_eval.json").resolve()),
               "text_data": None, "accuracy": 0.5}
    (ev / "eval.json").write_text(json.dumps(earlier))
    other = tmp_path / "other.json"
    other.write_text((demo_dir / "sft_eval.json").read_text())
    res = run([sys.executable, "launch/evaluate.py", "--model", str(sft_uniform25), "--data", str(other),
               "--output-dir", str(ev)], timeout=300)
    assert res.returncode == 2 and "holds the evaluation of another model or data set" in res.stderr
    assert f"data {earlier['data']} (now {other})" in res.stderr and "Loading weights" not in res.stdout + res.stderr
    assert json.loads((ev / "eval.json").read_text()) == earlier
    (ev / "eval.json").write_text('{"mine": 1}')
    res = run([sys.executable, "launch/evaluate.py", "--model", str(sft_uniform25), "--data", str(other),
               "--output-dir", str(ev)], timeout=300)
    assert res.returncode == 2 and "holds an eval.json this program did not write" in res.stderr

    data = tmp_path / "captions.json"
    data.write_text((demo_dir / "pretrain.json").read_text())
    user_png = tmp_path / "plot.png"
    user_png.write_bytes(b"mine")
    for output, message in ((data, "exists and is not a scores file this program wrote"),
                            (sft_uniform25 / "config.json", "exists and is not a scores file"),
                            (tmp_path, "is a directory; give the scores file's path"),
                            (tmp_path / "plot.json", f"its chart {user_png} exists")):
        before = snapshot(tmp_path)
        res = run([sys.executable, "launch/importance.py", "--model", str(sft_uniform25), "--data", str(data),
                   "--samples", "4", "--output", str(output)], timeout=300)
        assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and snapshot(tmp_path) == before


def test_malformed_numbers_are_bad_samples_not_tracebacks(tmp_path):
    from lvlm_region.data import formats
    with pytest.raises(formats.BadSample) as e:
        formats.normalize('{"id": ' + "9" * 5000 + ', "conversations": []}')
    assert e.value.reason == "malformed_json"
    path = tmp_path / "d.json"
    path.write_text('[{"id": ' + "9" * 5000 + "}]")
    with pytest.raises(ValueError, match=f"{path} is not a valid LLaVA JSON list: Exceeds the limit"):
        list(formats.records(str(path)))


def test_demo_depth_known_before_generation_matches_the_built_model(demo_dir):
    from transformers import AutoConfig

    from lvlm_region.data import demo
    from lvlm_region.model.load import num_decoder_layers
    built = AutoConfig.from_pretrained(demo_dir / "base_model")
    planned = demo.planned_config()
    assert num_decoder_layers(planned) == num_decoder_layers(built) == 8
    assert planned.text_config.tie_word_embeddings == built.text_config.tie_word_embeddings
    assert config.DEMO_DIR == "data/demo" and os.path.isdir(demo_dir)


def test_a_run_whose_output_directory_is_deleted_stops_at_once_naming_it(demo_sft_data, tmp_path):
    """Before, the run went on writing into a directory that no longer existed (metrics to an unlinked file) or
    waited; now every rank stops at the next step with the cause."""
    import shutil
    import time

    from conftest import deepspeed_cmd
    out = tmp_path / "gone" / "run"
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *demo_sft_data,
                                              "--micro-batch", "4", "--num-workers", "0", "--max-steps", "400",
                                              "--log-every", "1"),
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().count("\n") >= 2:
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    shutil.rmtree(tmp_path / "gone")
    t0 = time.time()
    assert proc.wait(timeout=120) != 0
    assert time.time() - t0 < 60
    text = log.read_text()
    assert f"--output-dir {out} was deleted or replaced while the run was writing to it" in text, text[-3000:]
    assert not out.exists()  # nothing recreated it


def test_a_fresh_jit_build_lock_without_a_builder_stops_the_launch(demo_dir, tmp_path):
    """A build killed a minute ago left a fresh lock: the age check let the launch wait on it forever."""
    import time

    from lvlm_region.train import engine as eng
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    builder = subprocess.Popen(["sleep", "60"], cwd=lock.parent)  # a live build: a process works in its directory
    try:
        t0 = time.time()
        assert eng.orphaned_build_lock(str(tmp_path / "ext"), watch=5) is None and time.time() - t0 < 2
    finally:
        builder.kill()
        builder.wait()
    assert eng.orphaned_build_lock(str(tmp_path / "ext"), watch=1) == str(lock)
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(tmp_path / "out"), "--max-steps", "1"],
              env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"torch's JIT-build lock {lock} exists but no process on this machine is building there" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_setting_an_earlier_checkpoint_did_not_record_matches_only_while_unset(tmp_path):
    """A checkpoint written before --lr-groups existed resumes while it is unset, and is refused once it is set."""
    from lvlm_region.train.checkpoint import check_compatible
    saved = {"lr": 1e-3}
    check_compatible(saved, {"lr": 1e-3, "lr_groups": None}, tmp_path)
    with pytest.raises(ValueError, match=r"lr_groups: not recorded by the checkpoint \(an earlier version wrote it\), "
                                         r"now 'region=1e-3'"):
        check_compatible(saved, {"lr": 1e-3, "lr_groups": "region=1e-3"}, tmp_path)
