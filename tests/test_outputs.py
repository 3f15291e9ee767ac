"""Nothing a user owns is deleted or overwritten: output paths are checked before any work, the export's clean-up
removes only what an earlier export wrote, metrics.jsonl survives a torn line, waiting ranks stop when the
preparing rank dies. Real files, real launchers, real processes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run
from lvlm_region.train import checkpoint
from lvlm_region.data import demo
from lvlm_region.infra import outputs
from lvlm_region.data import prepare


def user_dir(path):
    """A directory holding the user's own files (as /data/images would)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "photo.jpg").write_bytes(b"the user's photo")
    (path / "notes.txt").write_text("keep me")
    return path


def snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_prepare_refuses_an_output_that_is_not_an_earlier_preparation(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "1", "messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}) + "\n")
    target = user_dir(tmp_path / "images")
    before = snapshot(target)
    res = run([sys.executable, "data_prep/prepare.py", "--data", str(data), "--model", "no/such/model",
               "--output", str(target)], timeout=120)
    assert res.returncode == 2
    assert f"--output {target} already holds files this program did not write (notes.txt, photo.jpg)" in res.stderr
    assert "Give a new or empty directory (nothing was written)" in res.stderr
    assert snapshot(target) == before  # refused before the model was even looked at (it does not exist)
    a_file = tmp_path / "out.txt"
    a_file.write_text("mine")
    res = run([sys.executable, "data_prep/prepare.py", "--data", str(data), "--model", "no/such/model",
               "--output", str(a_file)], timeout=120)
    assert res.returncode == 2 and f"--output {a_file} exists and is not a directory" in res.stderr
    assert a_file.read_text() == "mine"


def test_replace_dir_replaces_only_its_own_kind(tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "prepare.json").write_text("{}")
    earlier = tmp_path / "earlier"  # an earlier preparation: replaced
    earlier.mkdir()
    (earlier / "prepare.json").write_text('{"old": 1}')
    (earlier / "data-00000.arrow").write_text("old rows")
    outputs.replace_dir(str(staged), str(earlier), prepare.MARKER, "preparation", "--output")
    assert snapshot(earlier) == {"prepare.json": b"{}"}
    failed = tmp_path / "failed"  # a failed preparation leaves only its report: replaced too
    failed.mkdir()
    (failed / prepare.REPORT).write_text("{}")
    prepare.check_output(str(failed))
    theirs = user_dir(tmp_path / "theirs")
    with pytest.raises(outputs.OutputError, match="no prepare.json, so it is not an earlier preparation"):
        prepare.check_output(str(theirs))


def test_demo_builder_refuses_a_directory_it_did_not_write(tmp_path):
    target = user_dir(tmp_path / "mine")
    before = snapshot(target)
    t0 = time.perf_counter()
    with pytest.raises(outputs.OutputError, match=f"the demo directory .* no {demo.DONE_MARKER}, so it is not an "
                                                   "earlier demo"):
        demo.ensure(str(target))
    assert time.perf_counter() - t0 < 5 and snapshot(target) == before  # before the minutes of generation


def test_assembly_refuses_a_base_model_dir_it_did_not_write(tmp_path):
    from helpers import parts
    from lvlm_region.model import assemble
    llm, vision = parts.llm(tmp_path / "llm", "llama"), parts.clip(tmp_path / "clip")
    target = user_dir(tmp_path / "out" / "base_model")
    before = snapshot(target)
    with pytest.raises(outputs.OutputError, match="OUTPUT_DIR/base_model .* no ASSEMBLED"):
        assemble.assemble(str(llm), str(vision), "mlp2x_gelu", str(target))
    assert snapshot(target) == before
    assemble.assemble(str(llm), str(vision), "mlp2x_gelu", str(tmp_path / "fresh"))  # a new one is built
    assemble.assemble(str(llm), str(vision), "mlp2x_gelu", str(tmp_path / "fresh"), seed=1)  # its own: replaced
    assert json.loads((tmp_path / "fresh" / assemble.DONE).read_text())["seed"] == 1


def test_run_dir_checks(tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "run" / "mine.json"  # the user's data inside the output dir
    with pytest.raises(outputs.OutputError, match=f"--output-dir {out} contains --data {data}"):
        outputs.check_run_dir(str(out), {"--data": str(data)}, fresh=True, overwrite=False)
    with pytest.raises(outputs.OutputError, match=f"--output-dir {out} contains --model {out}"):
        outputs.check_run_dir(str(out), {"--model": str(out)}, fresh=False, overwrite=True)
    # What the run writes from its inputs is its own: an assembled base model, prepared data.
    outputs.check_run_dir(str(out), {"--data": str(out / "prepared" / "train"), "--model": None}, True, False)
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    outputs.check_run_dir(str(out), {}, fresh=False, overwrite=False)  # --resume: continue it
    outputs.check_run_dir(str(out), {}, fresh=True, overwrite=True)  # --overwrite: replace it
    with pytest.raises(outputs.OutputError, match=r"already holds a run \(metrics.jsonl\).*--resume auto.*--overwrite"):
        outputs.check_run_dir(str(out), {}, fresh=True, overwrite=False)


def test_fresh_run_into_an_earlier_run_is_refused_before_loading_and_overwrite_allows_it(demo_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"status": "complete"}')
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = snapshot(out)
    flags = ["--output-dir", str(out), "--max-steps", "2", "--micro-batch", "4", "--num-workers", "0",
             "--eval-max-samples", "2", "--save-every", "1"]
    res = run([sys.executable, "launch/sft.py", *flags], timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"--output-dir {out} already holds a run (run.json, metrics.jsonl)" in res.stderr
    assert "Loading weights" not in res.stdout + res.stderr and snapshot(out) == before
    # The same with the user's data inside the output dir: refused, whatever --overwrite says.
    res = run([sys.executable, "launch/sft.py", *flags, "--overwrite", "--data", str(out / "run.json")], timeout=300)
    assert res.returncode == 2 and f"contains --data {out / 'run.json'}" in res.stderr
    # --overwrite: the run replaces it; the earlier run's checkpoints are moved aside, never deleted.
    old = out / "checkpoints" / "step-00000009"
    old.mkdir(parents=True)
    (old / checkpoint.STATE_FILE).write_text('{"step": 9}')
    (out / "checkpoints" / checkpoint.LATEST).write_text(old.name)
    res = run([sys.executable, "launch/sft.py", *flags, "--overwrite"], timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert (out / "checkpoints" / checkpoint.ABANDONED / "step-00000009" / checkpoint.STATE_FILE).read_text() == \
        '{"step": 9}'
    assert checkpoint.find_latest(str(out)).name == "step-00000002"
    assert "--overwrite: checkpoints of the run this one replaces" in res.stdout + res.stderr


def test_export_removes_only_what_the_previous_export_wrote(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-notes.safetensors").write_text("the user's file, named like a shard")

    def lora_like(d):  # a LoRA export: merged weights in two shards plus adapter/
        for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "config.json"):
            open(os.path.join(d, name), "w").write("lora export")
        os.makedirs(os.path.join(d, "adapter"))
        open(os.path.join(d, "adapter", "adapter_model.safetensors"), "w").write("adapter")

    def full_like(d):
        for name in ("model.safetensors", "config.json"):
            open(os.path.join(d, name), "w").write("full export")

    checkpoint.export(str(out), lora_like)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    checkpoint.export(str(out), full_like)
    names = sorted(p.name for p in out.iterdir())
    assert names == [checkpoint.EXPORT_LIST, "config.json", "model-notes.safetensors", "model.safetensors"]
    assert (out / "model-notes.safetensors").read_text() == "the user's file, named like a shard"
    assert json.loads((out / checkpoint.EXPORT_LIST).read_text())["files"] == ["model.safetensors", "config.json"]


def test_metrics_tolerate_a_torn_last_line_and_a_damaged_middle_is_named(tmp_path, caplog):
    from lvlm_region.train.trainer import open_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level("WARNING"):
        assert outputs.read_jsonl(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert f"{path} line 3 is incomplete" in caplog.text
    f = open_metrics(str(path), start_step=1)  # resume at step 1: rewritten atomically, then appended to
    f.write('{"step": 2, "loss": 1.4}\n')
    f.close()
    assert outputs.read_jsonl(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.4}]
    assert not os.path.exists(str(path) + ".tmp")
    path.write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path} line 2 is not a JSON object"):
        outputs.read_jsonl(str(path))


def test_report_reads_a_run_whose_metrics_end_in_a_torn_line(tmp_path):
    run_dir = tmp_path / "u25"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "interrupted", "region": {"spec": "uniform25"},
                                                  "config": {}, "steps_done": 2}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"ste')
    res = run([sys.executable, "launch/report.py", str(run_dir), "--output", str(tmp_path / "rep")], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{run_dir / 'metrics.jsonl'} line 3 is incomplete" in res.stderr
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]
    assert rows[0]["curve"] == [[1, 2.0], [2, 1.0]]


HOLDER = """
import sys, time
from lvlm_region.infra.outputs import Heartbeat
with Heartbeat(sys.argv[1], every=0.2):
    print("beating", flush=True)
    time.sleep(600)
"""


def test_ranks_waiting_for_a_killed_preparing_rank_stop_within_the_timeout(tmp_path):
    from lvlm_region.train.run_setup import wait_for_preparation
    out = str(tmp_path / "prepared" / "train")
    os.makedirs(os.path.dirname(out))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, out + ".heartbeat"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "beating"
    try:
        # While the preparing process lives, its heartbeat keeps the waiter waiting past the timeout.
        import threading
        errors = []
        waiter = threading.Thread(target=lambda: errors.append(_wait(wait_for_preparation, out)), daemon=True)
        waiter.start()
        waiter.join(4.0)
        assert waiter.is_alive() and not errors
        os.kill(holder.pid, signal.SIGKILL)  # as the OOM killer would: no chance to report anything
        t0 = time.time()
        waiter.join(30)
        assert not waiter.is_alive()
        assert time.time() - t0 < 10  # 2 s without a heartbeat, plus the 1 s poll
        assert "rank 0 has given no sign of life" in errors[0] and "--prep-timeout" in errors[0]
    finally:
        holder.kill()
        holder.wait()


def _wait(fn, out):
    try:
        fn("data.json", out, {"never": "matches"}, timeout=2.0)
    except prepare.DataError as e:
        return str(e)
    return "returned"
