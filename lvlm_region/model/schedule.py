"""Moving regions (--region-schedule): which of a region's layers train in each period of N optimizer steps.

    schedule := ("random" | "cycle") ":" K "/" N

- ``random:K/N`` (LISA): every N steps K of the region's layers, drawn uniformly without replacement, seeded by the
  run's --seed and the period's index (the same draw on every rank, after a resume, and in a rerun).
- ``cycle:K/N`` (BAdam-like): the region's layers, in depth order, are cut into blocks of K consecutive candidates
  (the last block takes the rest); period p trains block p mod the number of blocks.

The region spec gives the candidate layers (``full``: all; ``uniform50``: half of them, evenly spread; a sub-layer
spec moves only that sub-layer); its other parts (the projector, ``+lm_head`` ...) train in every period. Steps are
numbered from 1: period p holds steps p*N+1 .. (p+1)*N.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from .regions import Region

KINDS = ("random", "cycle")
FORMS = ("valid schedules: random:K/N (K of the region's layers drawn at random every N optimizer steps, as LISA) | "
         "cycle:K/N (the region's layers in blocks of K, one block after another, N steps each, as BAdam); "
         "e.g. --region full --region-schedule random:2/10")


def parse(text: str) -> tuple[str, int, int]:
    """``random:2/10`` -> ("random", 2, 10); ValueError naming the fault and the valid forms."""
    m = re.fullmatch(r"\s*(\w+)\s*:\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or m[1] not in KINDS:
        raise ValueError(f"--region-schedule {text!r} is not a schedule. {FORMS}")
    k, every = int(m[2]), int(m[3])
    if k < 1 or every < 1:
        raise ValueError(f"--region-schedule {text!r}: K and N must be at least 1. {FORMS}")
    return m[1], k, every


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule over a resolved region's candidate layers."""

    text: str
    kind: str
    k: int
    every: int
    seed: int
    candidates: Region  # the region spec as resolved: its layers are the candidates, its parts train always

    def period(self, step: int) -> int:
        """The period of optimizer step ``step`` (1-based)."""
        return (max(step, 1) - 1) // self.every

    def blocks(self) -> list[tuple[int, ...]]:
        c = self.candidates.layers
        return [tuple(c[i:i + self.k]) for i in range(0, len(c), self.k)]

    def layers(self, period: int) -> tuple[int, ...]:
        """The layers that train in ``period``."""
        if self.kind == "cycle":
            blocks = self.blocks()
            return blocks[period % len(blocks)]
        rng = np.random.default_rng([self.seed, period])
        c = self.candidates.layers
        return tuple(sorted(c[i] for i in rng.choice(len(c), self.k, replace=False)))

    def region(self, period: int) -> Region:
        """The region that trains in ``period``: the candidates' parts and sub-layer, the period's layers."""
        return dataclasses.replace(self.candidates, layers=self.layers(period))

    def largest(self) -> Region:
        """The period region that needs the most memory, for planning: the K lowest candidates (a step keeps the
        activations of every layer from the lowest trained one upward for its backward pass)."""
        return dataclasses.replace(self.candidates, layers=self.candidates.layers[:self.k])

    def periods(self, total_steps: int) -> list[dict]:
        """Every period of a run of ``total_steps`` steps: its first and last step and its layers (run.json)."""
        return [{"period": p, "first_step": p * self.every + 1, "last_step": min((p + 1) * self.every, total_steps),
                 "layers": list(self.layers(p))} for p in range(self.period(total_steps) + 1)]

    def to_dict(self, total_steps: int) -> dict:
        return {"schedule": self.text, "kind": self.kind, "k": self.k, "every": self.every, "seed": self.seed,
                "candidates": list(self.candidates.layers), "adam_state": "reset at every switch",
                "periods": self.periods(total_steps)}


def resolve(text: str, candidates: Region, seed: int) -> Schedule:
    """--region-schedule against the resolved region; refused (ValueError, naming the fix) where it cannot move."""
    kind, k, every = parse(text)
    n = len(candidates.layers)
    if n == 0:
        raise ValueError(f"--region-schedule {text}: region {candidates.spec!r} selects no decoder layer to move "
                         "between; give the layers it may choose from as the region (e.g. --region full)")
    if k > n:
        raise ValueError(f"--region-schedule {text}: K={k} layers per period, but region {candidates.spec!r} has "
                         f"only {n} candidate layer(s) ({list(candidates.layers)}); lower K or widen the region")
    if k == n:
        raise ValueError(f"--region-schedule {text}: K={k} is every candidate layer of region {candidates.spec!r}, "
                         f"so the region never moves; lower K, or drop --region-schedule to train them all")
    return Schedule(text.strip(), kind, k, every, seed, candidates)
