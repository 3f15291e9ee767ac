import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = "deepspeed.launcher.launch"


@pytest.fixture(scope="session", autouse=True)
def repo_cwd():
    """Launchers and the demo directory are relative to the repository root, as in README."""
    os.chdir(ROOT)


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    """Remove DeepSpeed's CPU all-reduce buffers left by ranks this session killed (-9 skips their atexit)."""
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(Path("/dev/shm").glob(pattern))
    yield
    for f in set(Path("/dev/shm").glob(pattern)) - before:
        f.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def demo_dir(repo_cwd) -> Path:
    """The embedded demo data and tiny base model (generated once, reused while complete)."""
    from lvlm_region.data import demo
    from lvlm_region.config import DEMO_DIR
    return Path(demo.ensure(DEMO_DIR))


@pytest.fixture(scope="session")
def demo_sft_data(demo_dir, tmp_path_factory) -> list[str]:
    """--data / --eval-data / --text-eval-data: the demo's stage-2 sets prepared once for the demo model, as
    data_prep/prepare.py prepares them (its defaults), for the runs that test training rather than the default data
    path (which test_demo, test_launchers and sft_uniform25 run). Each such launch skips about 6 s of preparation."""
    from lvlm_region.data import prepare
    from lvlm_region.config import TEXT_EVAL
    out = tmp_path_factory.mktemp("demo_prepared")
    enc, tokenizer, _ = prepare.for_model(str(demo_dir / "base_model"), "auto", 2048)
    flags = []
    for flag, name in (("--data", "sft_train.json"), ("--eval-data", "sft_eval.json"),
                       ("--text-eval-data", TEXT_EVAL)):
        prepared = str(out / name.split(".")[0])
        prepare.prepare(str(demo_dir / name), str(demo_dir), enc, tokenizer, prepared)
        flags += [flag, prepared]
    return flags


@pytest.fixture(scope="session")
def sft_uniform25(demo_dir, tmp_path_factory) -> Path:
    """A short real stage-2 uniform25 run on the demo (3 steps, end-of-run evaluation of 6 held-out samples), shared
    by the tests of what reads a trained model (evaluation, pruning). Tests write their outputs elsewhere."""
    out = tmp_path_factory.mktemp("sft_uniform25") / "sft"
    res = run(deepspeed_cmd(1, "launch/sft.py", "--region", "uniform25", "--output-dir", str(out), "--max-steps",
                            "3", "--micro-batch", "4", "--num-workers", "0", "--eval-max-samples", "6"),
              timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    return out


def run(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repo root, capturing output; the caller asserts on the result.

    ``[sys.executable, SCRIPT.py, ...]`` runs in a child forked from the zygote (helpers/zygote.py: the same script as
    ``__main__`` in a process of its own, without 5 s of imports); so do the ranks of a ``deepspeed_cmd`` launch
    (the zygote's child does what DeepSpeed's per-node launcher does, forking the ranks); anything else (the
    ``deepspeed`` runner, bash, SLURM scripts) as a subprocess. On a timeout the
    whole process group is killed (launcher, ranks, DataLoader workers), so a hung run cannot outlive its test and
    load the machine for the tests after it.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if len(cmd) > 1 and cmd[0] == sys.executable and cmd[1].endswith(".py"):
        return _zygote().run(cmd, {"argv": cmd[1:]}, full_env, timeout)
    if cmd[:4] == [sys.executable, "-u", "-m", LAUNCHER]:
        import base64
        import json
        flags = dict(a[2:].split("=", 1) for a in cmd[4:7])
        ranks = json.loads(base64.urlsafe_b64decode(flags["world_info"]))["localhost"]
        return _zygote().run(cmd, {"argv": cmd[7:], "ranks": len(ranks), "master_port": flags["master_port"]},
                             full_env, timeout)
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Zygote:
    """helpers/zygote.py, started once per session on first use."""

    def __init__(self):
        import tempfile
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "zygote.py")], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.tmp = tempfile.mkdtemp(prefix="zygote-")

    def run(self, cmd: list[str], req: dict, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import json
        import select
        out, err = os.path.join(self.tmp, "out"), os.path.join(self.tmp, "err")
        self.proc.stdin.write(json.dumps({**req, "cwd": str(ROOT), "env": env, "stdout": out, "stderr": err}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            os.killpg(pid, signal.SIGKILL)
            self.proc.stdout.readline()
            raise subprocess.TimeoutExpired(cmd, timeout, open(out).read(), open(err).read())
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return subprocess.CompletedProcess(cmd, rc, open(out).read(), open(err).read())

    def close(self) -> None:
        import shutil
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


_ZYGOTE: list[Zygote] = []


def _zygote() -> Zygote:
    if not _ZYGOTE:
        import atexit
        _ZYGOTE.append(Zygote())
        atexit.register(_ZYGOTE[0].close)
    return _ZYGOTE[0]


def deepspeed_cmd(n: int, script: str, *args: str, runner: bool = False) -> list[str]:
    """``n`` local DeepSpeed ranks running ``script``.

    By default DeepSpeed's per-node launcher (``deepspeed.launcher.launch``, which spawns and watches the ranks)
    is started directly, with the world the ``deepspeed`` command would give it: on one node that command only
    resolves the host list and starts this launcher, and skipping it saves a Python start-up with DeepSpeed's
    import (about 1.4 s) per launch. ``runner=True`` starts the ``deepspeed`` command itself, as README does.

    ``run`` forks the ranks of this launcher's command from the zygote (about 6 s less per launch: no interpreter
    start-up and imports); a test that starts the command itself (``subprocess.Popen``: signals to the launcher, a
    killed rank) gets DeepSpeed's launcher and fresh rank processes."""
    import base64
    import json
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    if runner:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", port,
                script, *args]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(n))}).encode()).decode()
    return [sys.executable, "-u", "-m", LAUNCHER, f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={port}", script, *args]


def assert_dummy_changes_no_generation(model, layout, tok, prompt) -> None:
    """Greedy generation from a left-padded text-only batch: the masked dummy image in front changes no token or
    score."""
    import torch

    from lvlm_region.data.batches import collate
    outs = []
    for d in (layout.dummy(), None):
        g = collate([{"input_ids": prompt, "labels": prompt}], tok.pad_token_id, left_pad=True, dummy=d)
        gen = model.generate(**layout.model_inputs(g), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True)
        outs.append((gen.sequences[:, g["input_ids"].shape[1]:], torch.stack(gen.scores)))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)
