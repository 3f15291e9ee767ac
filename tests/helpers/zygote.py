"""A Python process that imports the package's heavy dependencies once, then forks one child per request to run a
script as ``python SCRIPT ARGS...`` would (tests/conftest.py ``run``).

Most single-process launches in the suite are refusals that exit within a second of parsing their flags, after about
5 s of importing torch, transformers, DeepSpeed and datasets. A child forked from here starts with those modules
imported and runs the same script file as ``__main__`` (``runpy``), in its own session, with the request's working
directory, environment and argv, its stdout and stderr written to the request's files; its exit status is what
``python SCRIPT`` would return. The launches of ranks (``deepspeed_cmd``) do not come through here.

Protocol, one JSON object per line: request {argv, cwd, env, stdout, stderr}; replies {"pid": ...} when the child
has started, then {"rc": ...} when it has ended.
"""
import json
import os
import runpy
import sys
import traceback

REPLIES = os.fdopen(os.dup(1), "w", buffering=1)  # the replies' own stream; what the imports print goes to stderr
os.dup2(2, 1)
sys.path.pop(0)  # this file's directory; a child gets its script's

import datasets  # noqa: E402, F401 - imported here so that no child imports them again
import deepspeed  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401

import lvlm_region.cli  # noqa: E402, F401
import lvlm_region.trainer  # noqa: E402, F401


def child(req: dict) -> None:
    os.setsid()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(os.devnull)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = list(req["argv"])
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
