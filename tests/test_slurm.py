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
from lvlm_region import checkpoint

FAKE = ROOT / "tests" / "helpers" / "fake_slurm"
FLAGS = ["--max-steps", "4", "--micro-batch", "4", "--num-workers", "1", "--log-every", "1",
         "--eval-max-samples", "2", "--save-every", "2"]


def sbatch(tmp: Path, out: Path, *extra: str) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PATH": f"{FAKE}:{os.environ['PATH']}", "PYTHON": sys.executable, "MASTER_PORT": port,
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(FAKE / "sbatch"), "--nodes", "2", "--output", str(tmp / "%x-%j.log"),
                             "launch/slurm/sft.sbatch", "--output-dir", str(out), *FLAGS, *extra],
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
def uninterrupted(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    out = tmp / "run"
    record, log = finish(sbatch(tmp, out))
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


def test_usr1_checkpoints_requeues_and_continues_exactly(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    out = tmp_path / "run"
    proc = sbatch(tmp_path, out)
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


def test_kill_9_of_one_rank_ends_the_job_promptly_naming_it(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    out = tmp_path / "run"
    proc = sbatch(tmp_path, out)
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
    record, log = finish(sbatch(tmp_path, out))
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
