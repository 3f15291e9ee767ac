"""What this program may write over or delete: only what it wrote itself.

Three kinds of directory are rebuilt whole (a preparation, the demo, an assembled ``base_model/``); each carries a
marker file its writer puts there, and ``replace_dir`` swaps a new one in only over an empty directory or one
with that marker. A run's output directory is checked before anything loads (``check_run_dir``): a fresh run
does not write over an earlier run's files unless asked to (``--overwrite``), and never into a directory that
holds its own inputs. ``metrics.jsonl`` is read tolerating a torn last line and rewritten atomically.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time

log = logging.getLogger(__name__)

# What marks a directory as a run's output (a fresh run there would overwrite or delete them).
RUN_FILES = ("run.json", "metrics.jsonl", "config.json", "model.safetensors", "model.safetensors.index.json",
             "projector.safetensors", "adapter")
# Directories inside an output dir that the run itself writes from its inputs (an input there is fine).
RUN_OWNED = ("base_model", "prepared")


class OutputError(ValueError):
    """An output path that would overwrite or delete something this program did not write."""


def _listing(path: str, limit: int = 5) -> str:
    names = sorted(os.listdir(path))
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_replaceable(path: str, marker: str | tuple[str, ...], what: str, flag: str,
                      also_ours: tuple[str, ...] = ()) -> None:
    """Refuse ``path`` unless it is absent, an empty directory, or a directory holding ``marker`` (one of them, if a
    tuple: every name the writer has used) or only the names in ``also_ours`` (what a failed earlier attempt of the
    same writer leaves), i.e. an earlier ``what``."""
    markers = (marker,) if isinstance(marker, str) else marker
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise OutputError(f"{flag} {path} exists and is not a directory; give a new directory path")
    names = set(os.listdir(path))
    if not names or names & set(markers) or names <= set(also_ours):
        return
    raise OutputError(f"{flag} {path} already holds files this program did not write ({_listing(path)}) and no "
                      f"{markers[-1]}, so it is not an earlier {what}; it would be replaced whole. Give a new or empty "
                      "directory (nothing was written)")


def replace_dir(staged: str, path: str, marker: str | tuple[str, ...], what: str, flag: str,
                also_ours: tuple[str, ...] = ()) -> None:
    """Move the finished directory ``staged`` to ``path``, replacing an earlier ``what`` there (checked again:
    something may have appeared while the work ran)."""
    check_replaceable(path, marker, what, flag, also_ours)
    if os.path.lexists(path):
        shutil.rmtree(path)
    os.rename(staged, path)


def set_aside_files(directory: str, names: list[str], prefix: str = "") -> str | None:
    """Move the entries ``names`` of ``directory`` into a new ``directory/abandoned/<prefix><N>`` (the first N free),
    by renames: nothing is copied or deleted. Returns that directory (None when there was nothing to move)."""
    names = [n for n in names if os.path.lexists(os.path.join(directory, n))]
    if not names:
        return None
    i = 1
    while os.path.lexists(os.path.join(directory, "abandoned", f"{prefix}{i}")):
        i += 1
    dest = os.path.join(directory, "abandoned", f"{prefix}{i}")
    os.makedirs(dest)
    for n in names:
        os.rename(os.path.join(directory, n), os.path.join(dest, n))
    return dest


def inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_run_dir(output_dir: str, inputs: dict[str, str | None], fresh: bool, overwrite: bool) -> None:
    """Refuse an output directory that equals or contains one of the run's ``inputs`` ({flag: path}), and a
    fresh run (``fresh``: no --resume) into a directory that already holds a run unless ``overwrite``.

    Inputs under OUTPUT_DIR/base_model or OUTPUT_DIR/prepared are the run's own (assembled model, prepared data).
    """
    owned = [os.path.join(output_dir, d) for d in RUN_OWNED]
    for flag, path in inputs.items():
        if path is None or any(inside(path, o) for o in owned):
            continue
        if inside(path, output_dir):
            raise OutputError(f"--output-dir {output_dir} contains {flag} {path}: the run writes its model, "
                              f"run.json and checkpoints there and could overwrite what it reads; choose an output "
                              "directory outside the inputs")
    if not fresh or overwrite or not os.path.isdir(output_dir):
        return
    found = [n for n in RUN_FILES if os.path.lexists(os.path.join(output_dir, n))]
    if found:
        raise OutputError(f"--output-dir {output_dir} already holds a run ({', '.join(found)}); a new run would "
                          "overwrite run.json and metrics.jsonl and replace the exported model. Pass --resume auto to "
                          "continue it, --overwrite to replace it, or choose a new --output-dir (nothing was written)")


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file; a torn last line (a crash mid-write) is dropped with a warning naming it.

    A malformed line before the last one is not a crash artefact: it raises ValueError naming file and line.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == last:
                log.warning("%s line %d is incomplete (a crash mid-write?); dropped: %.80r", path, i + 1, line)
                continue
            raise ValueError(f"{path} line {i + 1} is not a JSON object ({e}); the file is damaged") from None
        out.append(rec)
    return out


def write_json_atomic(path, obj: dict) -> None:
    """Replace ``path`` with ``obj`` as JSON, written aside, fsynced and renamed in (a crash keeps the old file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: str, records: list[dict]) -> None:
    """Replace ``path`` with ``records``, written aside, fsynced and renamed in (a crash keeps the old file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Heartbeat:
    """While open, a thread refreshes the file ``path`` every ``every`` seconds: ranks waiting on the file system
    for this process's work (rank 0 preparing data) see it alive, and see it die (SIGKILL, the OOM killer) when the
    file stops changing. The file is removed on a normal exit."""

    def __init__(self, path: str, every: float = 5.0):
        self.path, self.every = path, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                os.utime(self.path)
            except OSError:  # removed underneath: recreate it
                open(self.path, "w").close()

    def __enter__(self) -> "Heartbeat":
        open(self.path, "w").close()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def silence(path: str, since: float) -> float:
    """Seconds since ``path`` (a Heartbeat file) last changed; while it does not exist yet, since ``since``."""
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return time.time() - since
