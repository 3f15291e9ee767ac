"""A Python process that imports the package's heavy dependencies once, then forks one child per request to run a
script as ``python SCRIPT ARGS...`` would, or ``n`` ranks of it as DeepSpeed's launcher would (tests/conftest.py
``run``).

Every process the suite starts spends about 5 s importing torch, transformers, DeepSpeed and datasets before it
does anything, and most of them then exit within a second (refusals) or train a few steps of a tiny model. A child
forked from here starts with those modules imported and runs the same script file as ``__main__`` (``runpy``), in
its own session, with the request's working directory, environment and argv, its stdout and stderr written to the
request's files; its exit status is what ``python SCRIPT`` would return.

A request with ``ranks`` is ``python -m deepspeed.launcher.launch`` on one node (``launch`` below): the child
plays the launcher and forks the ranks, each with the environment and ``--local_rank`` that launcher gives it, and
watches them as it does. The ranks are real processes running the real script, with real DeepSpeed engines and
process groups; only their start differs (a fork instead of a new interpreter). The tests of the launcher's own
behaviour (signals to the launcher, a killed rank, the README commands, SLURM) start DeepSpeed's launcher itself.

Protocol, one JSON object per line: request {argv, cwd, env, stdout, stderr[, ranks, master_port]}; replies
{"pid": ...} when the child has started, then {"rc": ...} when it has ended.
"""
import json
import os
import runpy
import signal
import sys
import time
import traceback

REPLIES = os.fdopen(os.dup(1), "w", buffering=1)  # the replies' own stream; what the imports print goes to stderr
os.dup2(2, 1)
sys.path.pop(0)  # this file's directory; a child gets its script's

import datasets  # noqa: E402, F401 - imported here so that no child imports them again
import deepspeed  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401

import lvlm_region.train.cli  # noqa: E402, F401
import lvlm_region.train.trainer  # noqa: E402, F401


def child(req: dict) -> None:
    """The request's process: a script run as ``python SCRIPT ARGS``, or (``ranks``) the ranks' launcher."""
    os.setsid()
    os.chdir(req["cwd"])
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    if "ranks" in req:
        launch(req)
    run_script(req["argv"], req["env"])


def run_script(argv: list[str], env: dict) -> None:
    """Run ``argv[0]`` as ``__main__`` with ``argv`` and ``env`` as ``python`` would, and exit with its status."""
    os.environ.clear()
    os.environ.update(env)
    sys.stdin = open(os.devnull)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as python puts the script's directory first
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    except BaseException:  # noqa: BLE001 - reported as python reports an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(req: dict) -> None:
    """What ``deepspeed.launcher.launch`` does on one node, with ranks forked from here instead of started as new
    Python processes: the environment it gives rank ``r`` of ``n`` (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``LOCAL_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``CROSS_RANK``, ``CROSS_SIZE``) and ``--local_rank=r`` before
    the script's arguments; when a rank exits non-zero the others are terminated and its status is the launch's;
    SIGTERM and SIGINT are passed on to the ranks, as the launcher's handler does."""
    n, (script, *args) = req["ranks"], req["argv"]
    world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(req["master_port"]), "WORLD_SIZE": str(n),
             "LOCAL_SIZE": str(n), "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    ranks = []
    for r in range(n):
        pid = os.fork()
        if pid == 0:
            run_script([script, f"--local_rank={r}", *args], {**req["env"], **world, "RANK": str(r),
                                                                "LOCAL_RANK": str(r)})
        ranks.append(pid)

    def stop(signum, frame, code=1):
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30  # then SIGKILL, as terminate_process_tree
        while ranks and time.monotonic() < deadline:
            for pid in list(ranks):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    ranks.remove(pid)
            time.sleep(0.05)
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        os._exit(code & 0xFF)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while ranks:
        pid, status = os.wait()
        ranks.remove(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            stop(signal.SIGTERM, None, code)
    os._exit(0)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        print(json.dumps({"pid": pid}), file=REPLIES)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=REPLIES)


if __name__ == "__main__":
    main()
