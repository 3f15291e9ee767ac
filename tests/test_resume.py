"""Checkpoints and resume on two DeepSpeed CPU ranks, through the real launcher.

An interrupted run (stop signal, kill -9 of a rank, kill during a save) continued with --resume auto produces
bit-identical per-step losses, learning rates, grad norms and final weights to the uninterrupted run.
"""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, deepspeed_cmd, run
from lvlm_region.train import checkpoint

STEPS = ["--max-steps", "6", "--micro-batch", "4", "--num-workers", "1", "--log-every", "1",
         "--eval-max-samples", "2", "--save-every", "2"]


def launch(out: Path, *flags: str) -> subprocess.Popen:
    """Start a 2-rank stage-2 run in its own process group (so a test can kill all of it at once)."""
    log = open(str(out) + ".log", "a")
    return subprocess.Popen(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *STEPS, *flags), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def rank_pid(proc: subprocess.Popen, local_rank: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if f"--local_rank={local_rank}" in p.cmdline():
                    return p.pid
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise TimeoutError("rank process not found")


def wait_for(cond, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended early with {proc.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def steps_logged(out: Path) -> int:
    f = out / "metrics.jsonl"
    lines = f.read_text().splitlines() if f.exists() else []
    return max((json.loads(x).get("step", 0) for x in lines if x.strip()), default=0)


def history(out: Path) -> list[tuple]:
    """Per-step (step, loss, lr, grad_norm) and the eval record: everything but timings."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) if "loss" in r else ("eval", r["eval"]) for r in recs]


def resume(out: Path, *flags: str) -> subprocess.CompletedProcess:
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *STEPS, *flags, "--resume", "auto"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def uninterrupted(zero: str, data: list[str], tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"ref{zero}") / "run"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *STEPS, *data, "--zero", zero))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return zero, out


@pytest.fixture(scope="module")
def ref2(demo_sft_data, tmp_path_factory):
    """The uninterrupted ZeRO-2 run (checkpoints at steps 4 and 6 are kept)."""
    return uninterrupted("2", demo_sft_data, tmp_path_factory)


@pytest.fixture(scope="module")
def ref3(demo_sft_data, tmp_path_factory):
    return uninterrupted("3", demo_sft_data, tmp_path_factory)


@pytest.fixture(params=["ref2", "ref3"])
def reference(request):
    """The uninterrupted run, for each ZeRO stage."""
    return request.getfixturevalue(request.param)


def copy_checkpoints(ref: Path, out: Path, keep: str) -> None:
    """out/checkpoints holds ref's checkpoints up to `keep`, with `latest` naming it (a run interrupted there), and
    out/prepared ref's prepared data if it prepared any (as the interrupted run left it; the resumed run reuses it)."""
    import shutil
    shutil.copytree(ref / "checkpoints", out / "checkpoints")
    if (ref / "prepared").exists():
        shutil.copytree(ref / "prepared", out / "prepared")
    for p in (out / "checkpoints").glob("step-*"):
        if p.name > keep:
            shutil.rmtree(p)
    (out / "checkpoints" / checkpoint.LATEST).write_text(keep)


def test_stop_signal_checkpoints_and_resume_is_exact(demo_sft_data, reference, tmp_path):
    zero, ref = reference
    out = tmp_path / "run"
    proc = launch(out, *demo_sft_data, "--zero", zero)
    # the signal goes out after step 2 (a step takes ~0.2 s here: after step 3, once in a few runs the run had
    # ended before the signal arrived)
    pid = rank_pid(proc, 1)
    wait_for(lambda: steps_logged(out) >= 2, proc, poll=0.05)
    os.kill(pid, signal.SIGUSR1)  # one rank asked; both must stop at the same step
    assert proc.wait(timeout=300) == 0
    run_json = json.loads((out / "run.json").read_text())
    # rank 0 writes run.json; only rank 1 got the signal, so this also shows the ranks agreed to stop together
    assert run_json["status"] == "interrupted" and run_json["stop_reason"] == "another rank was asked to stop"
    stopped = run_json["steps_done"]
    assert 2 <= stopped < 6
    assert checkpoint.find_latest(str(out)).name == checkpoint.tag_for(stopped)
    first_session = run_json["time"]["gpu_seconds"]

    resume(out, *demo_sft_data, "--zero", zero)
    assert history(out) == history(ref)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    final = json.loads((out / "run.json").read_text())
    assert final["status"] == "complete" and final["resumed_from"].endswith(checkpoint.tag_for(stopped))
    assert final["time"]["gpu_seconds"] > first_session  # accumulated across the restart
    # steady-state sums continue across the restart; each session's first step is warm-up
    assert final["timing"]["steady_steps"] == 4 and json.loads((ref / "run.json").read_text())["timing"][
        "steady_steps"] == 5


def test_stop_file_and_sigterm(demo_sft_data, tmp_path):
    # The STOP file (what the SLURM scripts touch on USR1) stops the run at the first step and is consumed;
    # SIGTERM to a rank does the same, and a second SIGTERM during the save changes nothing.
    out = tmp_path / "run"
    out.mkdir()
    (out / checkpoint.STOP_FILE).touch()
    proc = launch(out, *demo_sft_data, "--zero", "2")
    assert proc.wait(timeout=300) == 0
    assert json.loads((out / "run.json").read_text())["steps_done"] == 1
    assert not (out / checkpoint.STOP_FILE).exists()

    proc = launch(out, *demo_sft_data, "--zero", "2", "--resume", "auto")
    wait_for(lambda: steps_logged(out) >= 2, proc)
    pid = rank_pid(proc, 0)
    os.kill(pid, signal.SIGTERM)
    partial = out / "checkpoints" / checkpoint.PARTIAL
    while proc.poll() is None and not partial.exists():
        time.sleep(0.005)
    try:
        os.kill(pid, signal.SIGTERM)  # again, during the save
    except ProcessLookupError:
        pass
    assert proc.wait(timeout=300) == 0
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "interrupted" and run_json["stop_reason"] == "SIGTERM"
    latest = checkpoint.find_latest(str(out))
    assert latest.name == checkpoint.tag_for(run_json["steps_done"])
    assert json.loads((latest / checkpoint.STATE_FILE).read_text())["step"] == run_json["steps_done"]


def test_kill_9_rank_exits_promptly_and_resume_is_exact(demo_sft_data, ref2, tmp_path):
    zero, ref = ref2  # one ZeRO stage is enough for the fault path
    out = tmp_path / "run"
    track = ("--report-to", "tensorboard,csv")
    proc = launch(out, *demo_sft_data, "--zero", zero, *track)
    wait_for(lambda: checkpoint.find_latest(str(out)) is not None and steps_logged(out) >= 3, proc)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    t0 = time.time()
    code = proc.wait(timeout=120)
    assert code != 0 and time.time() - t0 < 60
    resume(out, *demo_sft_data, "--zero", zero,
           *track)  # redoes the steps after the last checkpoint; metrics.jsonl drops their first try
    assert history(out) == history(ref)
    # the trackers drop the first try too: TensorBoard (purged from the checkpoint's step on) and the CSV hold
    # exactly what metrics.jsonl holds
    from test_commands import tensorboard_scalars

    from lvlm_region.infra.tracking import scalars
    want = {(n, r["step"]): v for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            for n, v in scalars(r).items()}
    tb = tensorboard_scalars(out / "tensorboard")
    assert set(tb) == set(want) and all(tb[k] == pytest.approx(v, rel=1e-6, abs=1e-30) for k, v in want.items())
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert {(n, int(st)): float(v) for st, n, v in (r.split(",") for r in rows)} == want
    assert len(rows) == len(want)


def test_kill_during_save_keeps_previous_checkpoint(demo_sft_data, tmp_path):
    out = tmp_path / "run"
    proc = launch(out, *demo_sft_data, "--zero", "2", "--save-every", "1", "--max-steps", "40")
    partial = out / "checkpoints" / checkpoint.PARTIAL
    wait_for(lambda: checkpoint.find_latest(str(out)) is not None and partial.exists(), proc, poll=0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mid-save
    proc.wait(timeout=60)
    latest = checkpoint.find_latest(str(out))
    assert latest is not None and (latest / checkpoint.STATE_FILE).is_file()
    res = resume(out, *demo_sft_data, "--zero", "2", "--save-every", "1", "--max-steps", "40")
    assert f"resumed from {latest}" in res.stdout
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_resume_refuses_a_different_run(demo_sft_data, ref2, tmp_path):
    zero, ref = ref2
    out = tmp_path / "run"
    copy_checkpoints(ref, out, "step-00000006")
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *STEPS, *demo_sft_data, "--zero", zero,
                            "--region", "layers:1,5", "--resume", "auto"))
    assert res.returncode != 0
    assert "cannot resume from" in res.stderr and "region: checkpoint {'layers': [0, 7]" in res.stderr
    assert "the trained layers and the optimizer's contents depend on it" in res.stderr
    assert "Loading weights" not in res.stdout + res.stderr  # refused before any weights load
    res = run(deepspeed_cmd(1, "launch/sft.py", "--output-dir", str(out), *STEPS, *demo_sft_data, "--zero", zero,
                            "--resume", "auto"))
    assert res.returncode != 0 and "world_size: checkpoint 2, now 1" in res.stderr
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *STEPS, *demo_sft_data, "--zero", zero))
    assert res.returncode != 0 and "already holds checkpoint step-00000006; pass --resume auto" in res.stderr


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no `unshare -rm` (user + mount namespaces) to mount a small "
                    "tmpfs as a real full disk; the failed-write path is still tested by the file-size-limit test")
def test_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(demo_sft_data, ref3, tmp_path):
    zero, ref = ref3
    # A 14 MB file system: the first ZeRO-3 checkpoint (about 8 MB) fits, the second does not.
    mnt, after = tmp_path / "mnt", tmp_path / "after"
    mnt.mkdir()
    train = " ".join(deepspeed_cmd(2, "launch/sft.py", "--output-dir", f"{mnt}/run", *STEPS, *demo_sft_data, "--zero",
                                   zero,
                                   "--save-every", "1"))
    script = (f"mount -t tmpfs -o size=14m none {mnt} && {{ {train}; echo $? > {tmp_path}/rc; }}; "
              f"cp -r {mnt}/run {after}")
    res = subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert int((tmp_path / "rc").read_text()) != 0, res.stdout[-3000:]
    assert "error: not enough disk space for a checkpoint under" in res.stderr
    assert "nothing was written and the previous checkpoint (step-00000001) is kept" in res.stderr
    assert checkpoint.find_latest(str(after)).name == "step-00000001"
    assert not list((after / "checkpoints").glob(f"*/{checkpoint.tag_for(2)}"))
    resume(after, *demo_sft_data, "--zero", zero)  # on a disk with room, the kept checkpoint continues the run exactly
    assert history(after) == history(ref)


def test_write_error_during_a_save_names_the_rank_and_keeps_the_previous_checkpoint(demo_sft_data, ref2, tmp_path):
    # Needs no privileges: a file-size limit (ulimit -f, SIGXFSZ ignored) makes the checkpoint's 2-5 MB files fail
    # to write with EFBIG in the middle of DeepSpeed's save, as a disk filled by another job would.
    zero, ref = ref2
    out = tmp_path / "run"
    copy_checkpoints(ref, out, "step-00000004")
    train = " ".join(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *STEPS, *demo_sft_data, "--zero", zero,
                                   "--resume", "auto"))
    res = run(["bash", "-c", f"trap '' XFSZ; ulimit -f 1024; exec {train}"])
    assert res.returncode != 0
    # torch's zip writer reports the failed write as a RuntimeError that does not name EFBIG; the message says
    # which checkpoint and rank, how much space is free and what to check.
    assert re.search(r"error: checkpoint step-00000006 could not be written on rank [01] \(RuntimeError: .*\); "
                     r"[0-9.]+ MB free under .*check free space, quota and file size limits", res.stderr)
    assert "the previous checkpoint " + str(out / "checkpoints" / "step-00000004") + " is kept" in res.stderr
    assert checkpoint.find_latest(str(out)).name == "step-00000004"
    assert not (out / "checkpoints" / "step-00000006").exists()
    assert not (out / "checkpoints" / checkpoint.PARTIAL / "step-00000006").exists()  # the partial save is gone
    resume(out, *demo_sft_data, "--zero", zero)  # without the limit the kept checkpoint continues the run exactly
    assert history(out) == history(ref)[4:]  # steps 5 and 6 and the eval (the copy brought no metrics.jsonl)


def test_saving_a_step_again_sets_the_abandoned_one_aside(demo_sft_data, ref2, tmp_path):
    # --resume DIR from step 4 while step 6 exists: step 6 of the abandoned attempt is moved to abandoned/ (never
    # deleted) when the resumed run writes its first checkpoint, and the new step 6 becomes `latest`.
    zero, ref = ref2
    out = tmp_path / "run"
    copy_checkpoints(ref, out, "step-00000006")
    old_state = (out / "checkpoints" / "step-00000006" / checkpoint.STATE_FILE).read_text()
    resume_from = out / "checkpoints" / "step-00000004"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *STEPS, *demo_sft_data, "--zero", zero,
                            "--resume", str(resume_from)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resumed from {resume_from}" in res.stdout
    new = out / "checkpoints" / "step-00000006"
    assert checkpoint.find_latest(str(out)) == new and new.joinpath(checkpoint.STATE_FILE).read_text() != old_state
    kept = out / "checkpoints" / checkpoint.ABANDONED / "step-00000006"
    assert kept.joinpath(checkpoint.STATE_FILE).read_text() == old_state
    assert "step-00000006" in res.stdout and "abandoned" in res.stdout
    assert history(out) == history(ref)[4:]  # steps 5 and 6 and the eval, as in the uninterrupted run
    assert json.loads(new.joinpath(checkpoint.STATE_FILE).read_text())["previous"] == "step-00000004"


def test_resume_auto_follows_the_runs_own_history(tmp_path):
    root = tmp_path / "checkpoints"

    def ckpt(step: int, previous: int | None) -> None:
        d = root / checkpoint.tag_for(step)
        d.mkdir(parents=True)
        d.joinpath(checkpoint.STATE_FILE).write_text(json.dumps(
            {"step": step, "previous": previous and checkpoint.tag_for(previous)}))

    ckpt(10, None), ckpt(20, 10), ckpt(30, 20)  # a first attempt
    ckpt(25, 20)  # a later attempt resumed from 20 and saved 25 (before it set 30 aside, say)
    (root / checkpoint.LATEST).write_text(checkpoint.tag_for(25))
    assert checkpoint.find_latest(str(tmp_path)).name == "step-00000025"  # not 30, which sorts later
    assert checkpoint.resolve_resume("auto", str(tmp_path)).name == "step-00000025"
    # A save that renamed its directory in and died before moving the pointer: its successor is taken.
    ckpt(35, 25)
    assert checkpoint.find_latest(str(tmp_path)).name == "step-00000035"


def test_rng_files_load_without_unpickling_code(tmp_path):
    import pickle

    import numpy as np
    import torch
    good = tmp_path / "rank0.pt"
    torch.save(checkpoint._rng_states(), good)  # as save() writes it
    state = checkpoint.load_rng_file(good)
    assert np.array_equal(state["numpy"][1], np.random.get_state()[1]) and torch.equal(state["torch"],
                                                                                         torch.get_rng_state())
    marker = tmp_path / "ran"

    class Crafted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"python": Crafted()}, tmp_path / "crafted.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.load_rng_file(tmp_path / "crafted.pt")
    assert not marker.exists()


def test_identity_difference_in_the_model_is_named():
    saved = {"model": "aaaa", "world_size": 2, "region": {"layers": [0, 7]}}
    with pytest.raises(ValueError) as e:
        checkpoint.check_compatible(saved, {**saved, "model": "bbbb"}, Path("ckpt"))
    assert "model: checkpoint 'aaaa', now 'bbbb' (the frozen weights and architecture come from it)" in str(e.value)
    assert "region" not in str(e.value)


EXPORT_SCRIPT = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from lvlm_region.train import checkpoint
out, width, shard = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(width)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2))
checkpoint.export(out, lambda d: model.save_pretrained(d, max_shard_size=shard))
"""


def test_final_export_is_written_aside_so_a_failed_write_keeps_the_previous_one(tmp_path):
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    def export(width: int, shard: str, limit_kb: int | None = None):
        cmd = f"exec {sys.executable} -c '{EXPORT_SCRIPT}' {tmp_path} {width} {shard}"
        return run(["bash", "-c", f"trap '' XFSZ; ulimit -f {limit_kb}; {cmd}" if limit_kb else cmd])

    res = export(32, "20KB")  # sharded: an index and several shard files
    assert res.returncode == 0, res.stderr[-2000:]
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    first = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()

    res = export(256, "1GB", limit_kb=256)  # its weights (~1.2 MB) cannot be written: the write fails part-way
    assert res.returncode != 0 and "File too large" in res.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in first.items())

    res = export(48, "1GB")  # one file now: the previous shards and index go, the staging leftover too
    assert res.returncode == 0, res.stderr[-2000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names and not names & set(shards) and "model.safetensors.index.json" not in names
    assert checkpoint.EXPORT_STAGING not in names
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.hidden_size == 48


@pytest.mark.parametrize("family,tuner", [("qwen3_vl", []), ("qwen3_5", ["--tuner", "lora", "--lora-r", "4"]),
                                          ("qwen3_vl_moe", []), ("qwen3_5_moe", ["--tuner", "lora", "--lora-r", "4"]),
                                          ("gemma3", ["--tuner", "lora", "--lora-r", "8"]),
                                          ("internvl", []), ("llava_next", []), ("llava_onevision", []),
                                          ("idefics3", [])])
def test_resume_of_other_families_from_a_checkpoint_is_exact(tmp_path, family, tuner):
    """A Qwen3-VL run (full tuner; Qwen2-VL's image path plus DeepStack), a Qwen3.5 run (LoRA on layers 1 and 3,
    Gated DeltaNet layers: adapters on their projections), Qwen3-VL MoE and Qwen3.5 MoE runs (the router's
    load-balancing loss in the gradient; Qwen3.5 MoE with LoRA: adapters on the linears, none on the experts), a
    Gemma 3 run (LoRA on the region, the projector fully), InternVL, LLaVA-NeXT, LLaVA-OneVision (with two-image
    samples) and Idefics3 runs (images as tiles) under ZeRO-3 (images of several sizes, text-only samples, an epoch
    boundary at step 4) resumed from its step-4 checkpoint: the same losses, learning rates, grad norms, evaluation
    and final bytes (the merged export, and the adapter).

    LoRA's dropout (0.05 by default) draws from the torch RNG every step: the resumed run must continue it exactly.
    It did not when the RNG was restored before rank 0 measured its CPU's matmul peak with torch.randn."""
    from helpers import family_data, gemma3, idefics3, internvl, llava_next, llava_onevision, qwen
    build = {"qwen3_vl": lambda d: qwen.build(d, family), "qwen3_5": lambda d: qwen.build(d, family),
             "qwen3_vl_moe": lambda d: qwen.build(d, family), "qwen3_5_moe": lambda d: qwen.build(d, family),
             "gemma3": gemma3.build, "internvl": internvl.build,
             "llava_next": llava_next.build, "llava_onevision": llava_onevision.build,
             "idefics3": idefics3.build}[family]
    ckpt = build(str(tmp_path / "ckpt"))
    if family == "llava_onevision":
        data = family_data.write(str(tmp_path / "data"), llava_onevision.SIZES, n=16)[0]
    else:
        data = qwen.write_data(str(tmp_path / "data"), n=16, text_every=3)
    flags = ["--model", ckpt, "--data", data, "--eval-data", data, "--zero", "3", "--image-aspect-ratio", "square",
             "--region", "layers:1,3", "--micro-batch", "2", "--lr", "1e-3", *tuner]
    ref = tmp_path / "ref"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(ref), *STEPS, *flags))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((ref / "run.json").read_text())["steps_per_epoch"] == 4
    out = tmp_path / "run"
    copy_checkpoints(ref, out, checkpoint.tag_for(4))
    resume(out, *flags)
    after = [h for h in history(ref) if h[0] == "eval" or h[0] > 4]  # the copy has no metrics of steps 1-4
    assert len(after) == 3 and history(out) == after
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    if tuner:
        adapter = "adapter/adapter_model.safetensors"
        assert (out / adapter).read_bytes() == (ref / adapter).read_bytes()
    if family in ("qwen3_5", "qwen3_5_moe"):  # adapters on the linear-attention layers' projections (and the shared
        from safetensors import safe_open   # expert's), none on the convolution, the router or the 3-D experts
        with safe_open(str(out / "adapter/adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert {re.search(r"\.layers\.(\d+)\.", k)[1] for k in keys} == {"1", "3"}
        assert any("linear_attn.in_proj_qkv.lora_A" in k for k in keys) and not any("conv1d" in k for k in keys)
        assert not any(".mlp.experts." in k or ".mlp.gate." in k for k in keys)
        assert any(".mlp.shared_expert.down_proj.lora_A" in k for k in keys) == (family == "qwen3_5_moe")
