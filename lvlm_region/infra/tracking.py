"""--report-to: the metrics.jsonl records sent to experiment trackers as well, from rank 0 only.

Each tracker uses its own library: TensorBoard through torch's ``SummaryWriter`` (OUTPUT_DIR/tensorboard),
Weights & Biases through ``wandb`` (OUTPUT_DIR/wandb; offline unless WANDB_MODE says otherwise or WANDB_API_KEY is
set, so a run without network still records everything, for ``wandb sync`` later), and a long-form CSV
(OUTPUT_DIR/metrics.csv: step, name, value). A tracker that fails to start or to log is dropped with one warning;
the run goes on and metrics.jsonl stays complete (it is written first and is the record of truth).

Scalars are named as in metrics.jsonl (``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ``forward_s``,
...); the end-of-run evaluation's numbers under ``eval/`` and ``text_eval/`` (``eval/accuracy``,
``eval/by_category/colour/accuracy``, ``text_eval/accuracy``: the text retention). The run config is logged as
hyper-parameters. A resumed run continues its TensorBoard curves (steps after the checkpoint are purged) and starts
a new wandb run in the same group (the output directory's name).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os

log = logging.getLogger(__name__)

DIRS = {"tensorboard": "tensorboard", "wandb": "wandb", "csv": "metrics.csv"}  # what each writes in OUTPUT_DIR


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics.jsonl record (nested dicts flattened with '/'), without its step."""
    out = {}
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def hyperparameters(config: dict) -> dict:
    """The run config as trackers take hyper-parameters: numbers, strings and bools; anything else as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}


class TensorBoard:
    def __init__(self, out: str, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run's curves continue from its checkpoint; the interrupted session's later points go
        self.writer = SummaryWriter(os.path.join(out, DIRS["tensorboard"]),
                                    purge_step=start_step + 1 if start_step else None)
        if not start_step:
            for summary in hparams(hyperparameters(config), {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: str, config: dict, start_step: int):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        name = os.path.basename(os.path.abspath(out))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lvlm_region"), dir=out, mode=mode,
                              name=name if not start_step else f"{name}-from-{start_step}", group=name,
                              config=hyperparameters(config), reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class CSV:
    def __init__(self, out: str, config: dict, start_step: int):
        self.path = os.path.join(out, DIRS["csv"])
        kept = []
        if start_step and os.path.isfile(self.path):  # a resumed run: the rows up to its checkpoint's step
            with open(self.path, newline="") as f:
                kept = [r for r in csv.reader(f)][1:]
            kept = [r for r in kept if len(r) == 3 and r[0].isdigit() and int(r[0]) <= start_step]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerows([["step", "name", "value"], *kept])
        self.file.flush()

    def log(self, values: dict[str, float], step: int) -> None:
        self.writer.writerows([step, name, repr(value)] for name, value in values.items())
        self.file.flush()

    def close(self) -> None:
        self.file.close()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "csv": CSV}


class Trackers:
    """The trackers --report-to names (config.trackers), each dropped with a warning when it fails."""

    def __init__(self, names: list[str], out: str, config: dict, start_step: int):
        self.active = {}
        for name in names:
            try:
                self.active[name] = KINDS[name](out, config, start_step)
            except Exception as e:  # noqa: BLE001 - a tracker never fails the run (ImportError, its own errors)
                self._failed(name, "start", e)

    def _failed(self, name: str, what: str, e: Exception) -> None:
        hint = ("; install it with pip install -e .[track]" if isinstance(e, ImportError) else "")
        log.warning("--report-to %s: could not %s (%s: %s)%s; the run goes on without it, metrics.jsonl has every "
                    "number", name, what, type(e).__name__, e, hint)

    def log(self, record: dict, step: int) -> None:
        values = scalars(record)
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(values, step)
            except Exception as e:  # noqa: BLE001
                self._failed(name, "log", e)
                self.active.pop(name)

    def close(self) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                self._failed(name, "close", e)
        self.active = {}
