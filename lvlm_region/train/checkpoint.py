"""Training checkpoints: atomic saves, resume from the newest complete one, what must match, stop requests.

Layout under ``<output_dir>/checkpoints/``::

    step-00000010/         a complete checkpoint; never written to after it appears under this name
        *_model_states.pt  DeepSpeed's files (this is DeepSpeed's own layout: save_dir/tag/): weights,
        *_optim_states.pt  frozen ones included, optimizer partitions, LR scheduler
        trainer_state.json step, data position, accumulated time, the identity a resume must match, and
                           ``previous``: the checkpoint this run continued from (saved or resumed before it)
        rng/rank<R>.pt     each rank's RNG states
    latest                 the name of the newest complete checkpoint of this run's history, replaced last
    abandoned/             checkpoints set aside, never deleted: those of an attempt abandoned by a resume from an
                           older step (moved by the resumed run's first save), or of a run replaced by --overwrite
    .partial/              a save in progress (removed when the next save starts)

Every rank writes into ``.partial/<tag>``; once all are done, rank 0 fsyncs the files, renames the directory
into place and only then replaces ``latest``. A crash or kill at any point leaves ``latest`` naming a complete
checkpoint (or, if it died between the rename and the pointer, the new one names the pointer's as ``previous``
and is found that way).
The output directory must be on a file system every node sees (as DeepSpeed's own checkpoints require).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from ..config import PLANNED, RESUME_MAY_CHANGE, RunConfig, flag
from ..infra.outputs import RUN_FILES, set_aside_files, write_json_atomic
from ..infra.tracking import DIRS as TRACKER_FILES
from .engine import barrier, load_state, rank, rng_state, save_state, set_rng_state

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PARTIAL = ".partial"
STATE_FILE = "trainer_state.json"
ABANDONED = "abandoned"  # checkpoints of an abandoned future (after a resume from an older step), set aside
STOP_FILE = "STOP"  # `touch <output_dir>/STOP` asks a running job to checkpoint and exit (the SLURM scripts do)


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def _previous(path: Path) -> str | None:
    """The checkpoint a checkpoint's run continued from (the one saved or resumed before it)."""
    try:
        return json.loads((path / STATE_FILE).read_text()).get("previous")
    except (OSError, ValueError):
        return None


def find_latest(output_dir: str) -> Path | None:
    """The newest complete checkpoint of the run's own history, or None.

    That is the one ``latest`` names, or its direct successor when a save renamed its directory in and died before
    moving the pointer. A checkpoint whose name sorts later but that continues another history (left by an
    abandoned later attempt, after a resume from an older step) is not taken. Without a pointer (the first save
    died before writing it), the newest complete one by name.
    """
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _complete(named):
            after = [p for p in root.glob("step-*") if p.name > named.name and _complete(p)
                     and _previous(p) == named.name]
            return max(after) if after else named
    complete = [p for p in root.glob("step-*") if _complete(p)]
    return max(complete) if complete else None


def set_aside(root: Path, paths: list[Path], why: str) -> None:
    """Move checkpoints into ``root/abandoned/`` (never deleted: they may be what the user wanted), saying so."""
    if not paths:
        return
    dest = root / ABANDONED
    dest.mkdir(exist_ok=True)
    moved = []
    for p in sorted(paths):
        target, i = dest / p.name, 1
        while target.exists():
            target, i = dest / f"{p.name}.{i}", i + 1
        os.rename(p, target)
        moved.append(target.name)
    log.warning("moved %s to %s (%s); nothing was deleted", ", ".join(moved), dest, why)


def set_aside_all(output_dir: str) -> None:
    """--overwrite: the earlier run's checkpoints go to abandoned/ and its ``latest`` pointer is removed, so a later
    --resume auto cannot continue the replaced run."""
    root = Path(output_dir) / CHECKPOINTS
    set_aside(root, list(root.glob("step-*")), "--overwrite: checkpoints of the run this one replaces")
    (root / LATEST).unlink(missing_ok=True)


def resolve_resume(resume: str | None, output_dir: str, overwrite: bool = False) -> Path | None:
    """Which checkpoint to start from: None (fresh), the newest of the run's history (`auto`), or a given directory.

    A fresh start into a directory that already holds checkpoints is refused (it would mix two runs' checkpoints)
    unless ``overwrite``, where the trainer sets them aside first.
    """
    latest = find_latest(output_dir)
    if resume in (None, "none"):
        if latest is not None and not overwrite:
            raise ValueError(f"--output-dir {output_dir} already holds checkpoint {latest.name}; pass --resume auto "
                             f"to continue that run, --overwrite to start a new one there (its checkpoints are moved "
                             f"to {CHECKPOINTS}/{ABANDONED}/), or choose a new --output-dir")
        return None
    if resume == "auto":
        found = [n for n in RUN_FILES if os.path.lexists(os.path.join(output_dir, n))]
        if latest is None and found and not overwrite:
            status = (read_run(output_dir) or {}).get("status", "unknown")
            raise ValueError(f"--resume auto: --output-dir {output_dir} holds an unfinished run (run.json status "
                             f"{status}; {', '.join(found)}) and no checkpoint to continue it from (it ran without "
                             f"--save-every, or stopped before its first save), so it would start over and replace "
                             f"those files. Pass --overwrite to start it again (its files are moved to "
                             f"{ABANDONED}/, never deleted), or choose a new --output-dir (nothing was written)")
        return latest
    path = Path(resume)
    if not _complete(path):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); give a "
                                f"{output_dir}/{CHECKPOINTS}/step-* directory or 'auto'")
    return path


class AlreadyComplete(Exception):
    """--resume auto into a run that finished with the same settings: there is nothing to do (a requeued job)."""

    def __init__(self, output_dir: str, summary: dict):
        super().__init__(f"{output_dir} is already complete (run.json status complete, {summary.get('steps_done')} "
                         "steps), nothing to do")
        self.summary = summary


def read_run(output_dir: str) -> dict | None:
    """The run.json in ``output_dir`` (None when there is none, or it is not a JSON object)."""
    try:
        with open(os.path.join(output_dir, "run.json")) as f:
            run = json.load(f)
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else None


def check_finished(cfg: RunConfig) -> None:
    """--resume auto into a finished run: raise AlreadyComplete when it ran these settings (every field but those a
    resume may change, config.RESUME_MAY_CHANGE, and those the planner or --global-batch set), else ValueError naming
    each difference: a typo in --output-dir must not report another run's result as this one's."""
    run = read_run(cfg.output_dir)
    if run is None or run.get("status") != "complete":
        return
    skip = set(RESUME_MAY_CHANGE) | (set(PLANNED) if cfg.plan == "auto" else set())
    skip |= {"grad_accum"} if cfg.global_batch is not None else set()
    had = run.get("config") or {}
    diffs = [f"{flag(f.name)}: that run {had.get(f.name)!r}, now {getattr(cfg, f.name)!r}"
             for f in dataclasses.fields(cfg) if f.name not in skip and had.get(f.name) != getattr(cfg, f.name)]
    if diffs:
        raise ValueError(f"--output-dir {cfg.output_dir} holds a complete run with other settings:\n  "
                         + "\n  ".join(diffs) + "\nchoose a new --output-dir, or pass --overwrite to replace it "
                         "(its files are moved aside, never deleted)")
    raise AlreadyComplete(cfg.output_dir, run)


def set_aside_run(output_dir: str) -> None:
    """--overwrite: the files of the run being replaced (run.json, metrics.jsonl, the trackers' files, its export as
    .export.json lists it) move to OUTPUT_DIR/abandoned/run-<N>/ (renames: nothing is copied or deleted)."""
    listed = Path(output_dir) / EXPORT_LIST
    exported = json.loads(listed.read_text()).get("files", []) + [EXPORT_LIST] if listed.is_file() else []
    names = ["run.json", "metrics.jsonl", *TRACKER_FILES.values(), *exported]  # --report-to's files too
    dest = set_aside_files(output_dir, names, "run-")
    if dest is not None:
        _fsync_dir(Path(output_dir))
        log.warning("--overwrite: moved the replaced run's %s to %s; nothing was deleted",
                    ", ".join(sorted(os.listdir(dest))), dest)


def fingerprint_dir(path: str | None, patterns=("config.json", "*.safetensors", "*.bin")) -> str | None:
    """A cheap identity of a checkpoint directory: config.json's bytes plus the names and sizes of weight files."""
    if path is None:
        return None
    h = hashlib.sha256()
    for pattern in patterns:
        for f in sorted(Path(path).glob(pattern)):
            h.update(f.name.encode())
            h.update(f.read_bytes() if f.name.endswith(".json") else str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def fingerprint_file(path: str | None) -> str | None:
    """fingerprint_dir of one file (a JSON file by its bytes, any other by its name and size)."""
    if path is None:
        return None
    path = os.path.abspath(path)
    return fingerprint_dir(os.path.dirname(path), (os.path.basename(path),))


# Why the settings of a run's identity (trainer.run_identity) must match on resume, for the refusal message; a
# setting not named here "changes what the run computes from here on".
IDENTITY_WHY = {
    "stage": "a different stage is a different run",
    "model": "the frozen weights and architecture come from it",
    "init": "the starting projector comes from it",
    "init_projector": "the starting projector comes from it",
    "region": "the trained layers and the optimizer's contents depend on it",
    "world_size": "ZeRO partitions and the data order depend on it; resume with the same number of ranks",
    "micro_batch": "the data order and batch size depend on it",
    "grad_accum": "the batch size depends on it",
    "global_batch": "the batch size depends on it",
    "data": "the data order depends on it",
    "dataset_size": "the data order depends on it",
    "seed": "the data order depends on it",
    "sampling": "the data order (length grouping) and the batches' layout (packing) depend on it",
    "total_steps": "the LR schedule depends on it",
    "max_steps": "the LR schedule depends on it",
    "epochs": "the LR schedule depends on it",
    "lr": "the LR schedule depends on it",
    "projector_lr": "the projector's LR schedule depends on it",
    "lr_groups": "each part's LR schedule depends on it",
    "region_schedule": "which layers train at each step, and when Adam's state restarts, depend on it",
    "warmup_ratio": "the LR schedule (its warm-up) depends on it",
    "weight_decay": "every optimizer step depends on it",
    "grad_clip": "every optimizer step depends on it",
    "tuner": "the trained parameters (whole layers or LoRA adapters of this shape) depend on it",
    "zero_stage": "the optimizer partitions depend on it",
    "offload": "where the optimizer state lives (DeepSpeedCPUAdam or the engine's Adam) depends on it",
    "ds_config": "the DeepSpeed settings of every step come from it",
    "precision": "the optimizer state's dtype depends on it",
    "template": "the token ids and labels of every sample depend on it",
    "image_aspect_ratio": "the pixels of every image depend on it",
    "image_folder": "which image files the samples read depends on it",
    "max_length": "which samples are kept depends on it",
    "verify_images": "which samples are kept depends on it",
    "allow_outside_images": "which samples are kept depends on it",
    "attn": "the attention kernel's arithmetic depends on it",
}
OTHER_WHY = "it changes what the run computes from here on"


def check_compatible(saved: dict, now: dict, where: Path) -> None:
    """Refuse a resume whose run differs from the checkpoint in anything that decides the future. A setting the
    checkpoint does not record (an earlier version wrote it) matches only while it is unset (None): what that
    version ran."""
    keys = list(now) + [k for k in saved if k not in now]
    diffs = [f"{k}: checkpoint {saved[k]!r}, now {now.get(k)!r} ({IDENTITY_WHY.get(k, OTHER_WHY)})"
             if k in saved else f"{k}: not recorded by the checkpoint (an earlier version wrote it), now {now[k]!r}"
             for k in keys if saved.get(k) != now.get(k) or (k in saved) != (k in now)
             and not (k not in saved and now.get(k) is None)]
    if diffs:
        raise ValueError(f"cannot resume from {where}: the run differs from the checkpoint in\n  "
                         + "\n  ".join(diffs) + "\nresume with the original settings, or start a new --output-dir")


def _rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            **rng_state()}


# What the RNG files hold besides tensors and plain Python values: numpy's state array. torch.load with
# weights_only=True unpickles nothing else, so a crafted file cannot run code (DeepSpeed's own *_states.pt files
# are loaded by DeepSpeed without that guard: --resume directories must come from a trusted source).
_RNG_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_rng_file(path: Path) -> dict:
    with torch.serialization.safe_globals(_RNG_GLOBALS):
        return torch.load(path, weights_only=True)


def restore_rng(state: dict) -> None:
    """Set this rank's RNGs (python, numpy, torch, accelerator) to a checkpoint's (``load`` returns them)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    set_rng_state(state)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
EXPORT_STAGING = ".export.partial"
EXPORT_LIST = ".export.json"  # the names the last export wrote into the output directory (what the next may remove)


def export(out: str, write) -> None:
    """Write a transformers export with ``write(staging_dir)`` into ``out/.export.partial``, then move it into
    ``out`` (rank 0 only), replacing the previous export there.

    The slow part, writing the weights, happens in staging: a crash or full disk there leaves the previous export
    in ``out`` whole and loadable. The files are fsynced and renamed in, ``config.json`` last. Then the files and
    directories that the previous export of this directory wrote (its list, ``.export.json``) and this one did not
    are removed (stale weight shards, a LoRA export's ``adapter/`` under a full-tuning export), so transformers never
    loads a mix of two exports. Nothing else is ever removed, whatever its name. The renames are quick but not one
    atomic step.
    """
    root = Path(out)
    staging = root / EXPORT_STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write(str(staging))
    _fsync_tree(staging)
    new = sorted(os.listdir(staging), key=lambda n: (n == "config.json", n))
    listed = root / EXPORT_LIST
    earlier = json.loads(listed.read_text())["files"] if listed.is_file() else None
    for name in new:
        target = root / name
        if (staging / name).is_dir():  # e.g. adapter/: the old one is set aside until the new one is in place
            old = root / f".{name}.old"
            if old.exists():
                shutil.rmtree(old)
            if target.exists():
                os.rename(target, old)
            os.rename(staging / name, target)
            if old.exists():
                shutil.rmtree(old)
        else:
            os.replace(staging / name, target)
    staging.rmdir()
    if earlier is None:  # an export by a version without the list: report, never guess
        unknown = [n for n in os.listdir(root) if _WEIGHTS.match(n) and n not in new]
        if unknown:
            log.warning("%s holds weight files this export did not write (%s); they were left in place: remove them "
                        "if they belong to an older export", out, ", ".join(sorted(unknown)))
    stale = [n for n in earlier or () if n not in new and os.path.lexists(root / n)]
    for name in sorted(stale, key=lambda n: not n.endswith(".index.json")):  # the index before its shards
        if (root / name).is_dir() and not (root / name).is_symlink():
            shutil.rmtree(root / name)
        else:
            os.remove(root / name)
    write_json_atomic(listed, {"files": new})
    _fsync_dir(root)


def save(engine, output_dir: str, step: int, state: dict, keep: int) -> Path:
    """Write a complete checkpoint of step ``step`` atomically (call on every rank); returns its path."""
    root = Path(output_dir) / CHECKPOINTS
    tag, partial = tag_for(step), root / PARTIAL
    final = root / tag
    if rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a save that died
        root.mkdir(parents=True, exist_ok=True)
    barrier()
    _check_space(root, engine)  # every rank sees the same file system, so all raise or none does
    barrier()
    try:
        save_state(engine, str(partial), tag)
        (partial / tag / "rng").mkdir(exist_ok=True)
        torch.save(_rng_states(), partial / tag / "rng" / f"rank{rank()}.pt")
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (disk full, quota, file size
        # limit) as a RuntimeError from its zip writer that does not say why; the launcher then stops the others
        shutil.rmtree(partial / tag, ignore_errors=True)
        free = shutil.disk_usage(root).free / 1e6
        raise OSError(f"checkpoint {tag} could not be written on rank {rank()} ({type(e).__name__}: {e}); "
                      f"{free:.1f} MB free under {root}; the previous checkpoint {find_latest(output_dir)} is kept; "
                      f"check free space, quota and file size limits (ulimit -f), then rerun with --resume auto") from e
    barrier()
    if rank() == 0:
        write_json_atomic(partial / tag / STATE_FILE, state)
        _fsync_tree(partial / tag)
        # Checkpoints after the one this run continued from belong to an abandoned attempt (a run resumed from an
        # older step): set aside, so `latest` and rotation only ever see this history.
        previous = state.get("previous") or ""
        set_aside(root, [p for p in root.glob("step-*") if p.name > previous],
                  f"written by an abandoned attempt after {previous or 'the start'}; this run continued from "
                  f"{previous or 'the start'}")
        os.rename(partial / tag, final)
        _fsync_dir(root)
        (root / f"{LATEST}.tmp").write_text(tag)
        os.replace(root / f"{LATEST}.tmp", root / LATEST)
        _fsync_dir(root)
        if keep > 0:  # keep the newest `keep` checkpoints, this one included
            older = sorted(p for p in root.glob("step-*") if p.name < tag)
            for old in older[:max(0, len(older) - keep + 1)]:
                shutil.rmtree(old)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def checkpoint_bytes(engine) -> int:
    """About what one checkpoint writes, all ranks together: every weight once in its own dtype (DeepSpeed's
    module states, frozen ones included) and, per trainable parameter, the optimizer's fp32 master copy and Adam's
    two fp32 moments (12 bytes; partitioned over the ranks by ZeRO, so the sum does not depend on the stage)."""
    total = 0
    for p in engine.module.parameters():
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3: the local shape is [0]
        total += n * p.element_size() + (12 * n if p.requires_grad else 0)
    return total


def _check_space(root: Path, engine) -> None:
    """Refuse to start a save that cannot fit, before touching anything (the previous checkpoint stays)."""
    previous = find_latest(str(root.parent))
    if previous is not None:
        need = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
    else:
        need = checkpoint_bytes(engine)
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(f"not enough disk space for a checkpoint under {root}: {free / 1e6:.1f} MB free, about "
                      f"{need / 1e6:.1f} MB needed; nothing was written and the previous checkpoint "
                      f"({previous.name if previous else 'none'}) is kept; free space (or lower --keep-checkpoints) "
                      f"and rerun with --resume auto")


def read_state(path: Path) -> dict:
    """A checkpoint's trainer state (step, data position, identity, totals), read before any weights load."""
    return json.loads((path / STATE_FILE).read_text())


def load(engine, path: Path) -> dict:
    """Restore a checkpoint written by ``save`` into the engine; returns this rank's RNG states, which the caller
    sets with ``restore_rng`` right before the first step, so nothing in between draws from them."""
    load_state(engine, str(path.parent), path.name)
    return load_rng_file(path / "rng" / f"rank{rank()}.pt")


class StopRequest:
    """SIGTERM, SIGUSR1 or a STOP file in the output directory ask the run to checkpoint and exit cleanly.

    The handler only records the request; the training loop acts on it at the next step boundary, after all
    ranks agree. A second signal during the save changes nothing (the save is atomic in any case).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, output_dir: str):
        self.stop_file = Path(output_dir) / STOP_FILE
        self.reason: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def poll(self) -> bool:
        """Whether this rank has been asked to stop (rank 0 also looks for the STOP file)."""
        if self.reason is None and rank() == 0 and self.stop_file.exists():
            self.reason = f"{self.stop_file} exists"
        return self.reason is not None

    def clear_file(self) -> None:
        if rank() == 0 and self.stop_file.exists():
            self.stop_file.unlink()

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
