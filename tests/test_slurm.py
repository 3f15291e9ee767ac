"""The real sbatch scripts, run by stand-in sbatch / srun / scontrol (tests/helpers/fake_slurm) that emulate a
2-node allocation on this machine: one torchrun per "node", one CPU rank each, real DeepSpeed, gloo on loopback.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from lvlm_region.train import checkpoint

FAKE = ROOT / "tests" / "helpers" / "fake_slurm"
FLAGS = ["--max-steps", "4", "--micro-batch", "4", "--num-workers", "1", "--log-every", "1",
         "--eval-max-samples", "2", "--save-every", "2"]


def sbatch(tmp: Path, out: Path, data: list[str], *extra: str) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PATH": f"{FAKE}:{os.environ['PATH']}", "PYTHON": sys.executable, "MASTER_PORT": port,
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(FAKE / "sbatch"), "--nodes", "2", "--output", str(tmp / "%x-%j.log"),
                             "launch/slurm/sft.sbatch", "--output-dir", str(out), *FLAGS, *data, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[dict, str]:
    stdout, _ = proc.communicate(timeout=timeout)
    record = json.loads(re.search(r"fake-sbatch: (\{.*\})", stdout).group(1))
    return record, Path(record["output"]).read_text()


def losses(out: Path) -> list:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                                               .splitlines()) if "loss" in r]


def steps_logged(out: Path) -> int:
    return len(losses(out)) if (out / "metrics.jsonl").exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(demo_sft_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    out = tmp / "run"
    record, log = finish(sbatch(tmp, out, demo_sft_data))
    assert record["exit_code"] == 0 and record["restarts"] == 0, log[-4000:]
    return out, log


def test_two_node_job_runs_with_the_right_ranks(uninterrupted):
    out, log = uninterrupted
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "complete" and run_json["world_size"] == 2
    assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in run_json["ranks"]] == [(0, 0, 0), (1, 1, 0)]
    # the resolved command is echoed at the top of the per-job log, with the node count from sbatch's --nodes
    head = log.splitlines()[:4]
    assert head[0].startswith("=== job ") and "on 2 node(s) x 1 rank(s): localhost 127.0.0.2" in head[0]
    assert "srun --kill-on-bad-exit=1 --nodes=2" in head[2] and "torch.distributed.run" in head[2]
    assert "--resume auto" in head[2]


def test_usr1_checkpoints_requeues_and_continues_exactly(uninterrupted, demo_sft_data, tmp_path):
    ref, _ = uninterrupted
    out = tmp_path / "run"
    proc = sbatch(tmp_path, out, demo_sft_data)
    deadline = time.time() + 300
    while steps_logged(out) < 1:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    # `#SBATCH --signal=B:USR1@600` signals the batch shell only
    shell = next(p for p in psutil.Process(proc.pid).children() if "launch/slurm/sft.sbatch" in " ".join(p.cmdline()))
    shell.send_signal(signal.SIGUSR1)
    record, log = finish(proc)
    assert record["exit_code"] == 0 and record["restarts"] == 1, log[-4000:]
    assert "USR1: asking the run to checkpoint and exit" in log and "requeueing job" in log
    assert "resumed from" in log and "(restart 1)" in log
    assert losses(out) == losses(ref)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_kill_9_of_one_rank_ends_the_job_promptly_naming_it(uninterrupted, demo_sft_data, tmp_path):
    ref, _ = uninterrupted
    out = tmp_path / "run"
    proc = sbatch(tmp_path, out, demo_sft_data)
    deadline = time.time() + 300
    while checkpoint.find_latest(str(out)) is None:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    log_file = next(tmp_path.glob("lvlm-sft-*.log"))
    pid = int(re.search(r"rank 1 of 2: .* pid (\d+)", log_file.read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    record, log = finish(proc)
    assert record["exit_code"] != 0 and time.time() - t0 < 60
    assert re.search(r"rank\s*:\s*1 \(local_rank: 0\)\s+exitcode\s*:\s*-9", log), log[-4000:]  # torchrun's summary
    assert "srun: error: 127.0.0.2: task 1" in log
    time.sleep(1)
    leftovers = [q.pid for q in psutil.process_iter(["cmdline"]) if str(out) in " ".join(q.info["cmdline"] or [])]
    assert leftovers == [], "ranks of the failed job are still running"
    # the next start of the same job continues from the last checkpoint and ends where the uninterrupted run did
    record, log = finish(sbatch(tmp_path, out, demo_sft_data))
    assert record["exit_code"] == 0 and "resumed from" in log
    assert losses(out) == losses(ref)


def test_report_sbatch(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    env = {**os.environ, "PATH": f"{FAKE}:{os.environ['PATH']}", "PYTHON": sys.executable}
    res = subprocess.run([str(FAKE / "sbatch"), "--dependency", "afterok:1", "--output", str(tmp_path / "%x-%j.log"),
                          "launch/slurm/report.sbatch", str(ref), "--output", str(tmp_path / "report")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    record = json.loads(re.search(r"fake-sbatch: (\{.*\})", res.stdout).group(1))
    log = Path(record["output"]).read_text()
    assert record["exit_code"] == 0, log
    assert "launch/report.py" in log.splitlines()[1] and "wrote report.json" in log
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["runs"]
    assert rows[0]["steps"] == 4 and rows[0]["ranks"] == 2


COMPARE_ENV = {"PATH": f"{FAKE}:{os.environ['PATH']}", "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}


def compare_sbatch(tmp: Path, *args: str, popen: bool = False):
    env = {**os.environ, **COMPARE_ENV, "COMPARE_ARM_OPTS": f"--output={tmp}/%x-%A_%a.log", "COMPARE_REPORT_OPTS": ""}
    cmd = [str(FAKE / "sbatch"), "--output", str(tmp / "%x-%j.log"), "launch/slurm/compare.sbatch", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    return res, Path(json.loads(re.search(r"fake-sbatch: (\{.*\})", res.stdout).group(1))["output"])


def compare_data(demo_dir: Path, tmp_path: Path) -> list[str]:
    """A small copy of the demo's stage-2 sets, the repository's launchers, the demo: a submit directory."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to((demo_dir / "images").resolve())
    for name, n in (("sft_train.json", 48), ("sft_eval.json", 6), ("text_eval.json", 6)):
        (data / name).write_text(json.dumps(json.loads((demo_dir / name).read_text())[:n]))
    (tmp_path / "launch").symlink_to(ROOT / "launch")  # submitted from a directory with the repository's launchers
    (tmp_path / "data" / "demo").symlink_to(demo_dir.resolve())
    return ["--model", str(demo_dir / "base_model"), "--data", str(data / "sft_train.json"), "--eval-data",
            str(data / "sft_eval.json"), "--text-eval-data", str(data / "text_eval.json"), "--micro-batch", "4",
            "--num-workers", "0", "--allow-outside-images"]


def test_compare_sbatch_runs_the_arms_as_an_array_then_the_report(demo_dir, tmp_path):
    """The driver job checks the specs, submits one array task per arm and the report after them."""
    out = tmp_path / "cmp"
    res, log = compare_sbatch(tmp_path, "--regions", "full,uniform25", "--output-dir", str(out),
                              *compare_data(demo_dir, tmp_path), "--max-steps", "3")
    driver = log.read_text()
    assert res.returncode == 0, driver + res.stderr[-3000:]
    assert "2 arm(s): full-seed0 uniform25-seed0" in driver
    array, report = re.search(r"arms: array job (\d+); report: job (\d+)", driver).groups()
    for task, region in ((0, "full"), (1, "uniform25")):
        task_log = (tmp_path / f"lvlm-compare-arm-{array}_{task}.log").read_text()
        assert f"--arm {task}" in task_log and f"arm {region}-seed0: trained" in task_log
        assert json.loads((out / "arms" / f"{region}-seed0" / "run.json").read_text())["status"] == "complete"
    report_log = (tmp_path / f"lvlm-compare-report-{report}.log").read_text()
    assert "--report-only" in report_log.splitlines()[1]
    rep = json.loads((out / "report.json").read_text())
    assert [g["region"] for g in rep["regions"]] == ["full", "uniform25"]
    assert [a["status"] for a in rep["arms"]] == ["reused", "reused"]  # the report job trained nothing


def test_compare_sbatch_refuses_a_bad_spec_before_queueing(demo_dir, tmp_path):
    (tmp_path / "launch").symlink_to(ROOT / "launch")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_dir.resolve())
    res, log = compare_sbatch(tmp_path, "--regions", "full,layers:1,99", "--output-dir", str(tmp_path / "c"))
    text = log.read_text()
    assert res.returncode != 0 and "layer index 99 is out of range 0..7" in text
    assert "array job" not in text and not (tmp_path / "c").exists()


def test_a_compare_arm_checkpoints_on_usr1_requeues_and_continues(demo_dir, tmp_path):
    """An arm near its time limit: USR1 to its batch shell (what --signal=B:USR1@600 sends) makes it checkpoint and
    exit; the task requeues itself and the arm continues from the checkpoint to its end, then the report runs. Before,
    an arm cut off at the limit lost everything since its last save."""
    out = tmp_path / "cmp"
    proc = compare_sbatch(tmp_path, "--regions", "full", "--output-dir", str(out), *compare_data(demo_dir, tmp_path),
                          "--max-steps", "8", "--log-every", "1", popen=True)
    arm = out / "arms" / "full-seed0"
    deadline = time.time() + 300
    while steps_logged(arm) < 1:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    shell = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "compare.sbatch" in " ".join(p.cmdline()) and "SLURM_ARRAY_TASK_ID" in p.environ())
    shell.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    task_log = next(tmp_path.glob("lvlm-compare-arm-*_0.log")).read_text()
    assert "USR1: asking the run to checkpoint and exit" in task_log and "requeueing job" in task_log, task_log[-3000:]
    assert "arm full-seed0: interrupted" in task_log and "(array task 0, restart 1)" in task_log
    assert "resumed from" in task_log and "arm full-seed0: continued" in task_log
    run_json = json.loads((arm / "run.json").read_text())
    assert run_json["status"] == "complete" and run_json["steps_done"] == 8
    assert [r["step"] for r in map(json.loads, (arm / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == \
        list(range(1, 9))
    assert json.loads((out / "report.json").read_text())["regions"][0]["region"] == "full"


def test_compare_sbatch_with_a_model_needs_the_arms_options(demo_dir, tmp_path):
    """Without COMPARE_ARM_OPTS the arms and the report ran with the partition's defaults: on a CPU-only node the
    report's evaluation of the start model took hours. The driver now stops first, queueing nothing."""
    (tmp_path / "launch").symlink_to(ROOT / "launch")
    env = {**os.environ, **COMPARE_ENV}
    env.pop("COMPARE_ARM_OPTS", None)
    res = subprocess.run([str(FAKE / "sbatch"), "--output", str(tmp_path / "%x-%j.log"), "launch/slurm/compare.sbatch",
                          "--regions", "full", "--model", str(demo_dir / "base_model"), "--output-dir",
                          str(tmp_path / "c")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    log = Path(json.loads(re.search(r"fake-sbatch: (\{.*\})", res.stdout).group(1))["output"]).read_text()
    assert res.returncode == 2 and "set COMPARE_ARM_OPTS" in log and "array job" not in log
