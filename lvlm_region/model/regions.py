"""Region specs: which parts of an LVLM train.

A spec is a string resolved against the LLM's decoder depth L into a sorted list of 0-based decoder
layer indices plus an on/off switch for every other part of the model. Grammar::

    spec      := layers [ "." sublayer ] ( ("+" | "-") part )*
    layers    := "full" | "none" | "paper32"
               | ("uniform" | "first" | "last" | "middle") P        P percent, 0 < P <= 100
               | ("uniform" | "first" | "last" | "middle") ":" K    K layers, 1 <= K <= L
               | "layers:" i ("," i)*                               explicit 0-based indices
               | ("top" | "bottom") (P | ":" K) "@" FILE             by importance scores (below)
    sublayer  := "attn" | "mlp"
    part      := "projector" | "vision" | "embed" | "norm" | "lm_head"

Sub-layers: ``uniform25.mlp`` trains only the MLP of the selected layers (an MoE layer's router, experts and shared
expert), ``uniform25.attn`` only their token mixer (self-attention; Qwen3.5's Gated DeltaNet in its linear-attention
layers); the layer norms stay frozen. With a scores file the sub-layer comes before the @: ``top25.mlp@FILE``.
Which module is which is the family's (``Family.sublayer``).

Defaults: the projector trains; vision tower, token embeddings, final norm and LM head are frozen.
``+part`` switches a part on, ``-part`` off (``uniform25+lm_head``, ``none-projector``).

Rounding: k = floor(P * L / 100 + 1/2) computed exactly (round half up), at least 1.
Uniform placement: for k >= 2, layer i (i = 0..k-1) is floor(i * (L-1) / (k-1) + 1/2), so the first
and last layers are always included and consecutive gaps are floor or ceil of (L-1)/(k-1): they differ
by at most one. k = 1 picks the middle layer floor((L-1)/2). For L=32, k=8: 0,4,9,13,18,22,27,31.
``paper32`` is the list of the paper's released code for 32-layer LLMs (1,5,9,13,19,23,27,31); it is
refused for other depths.

Scores: ``top25@runs/scores.json`` takes the k highest-scoring layers of a ``launch/importance.py`` scores file
(``bottom``: the k lowest), k counted as above. Ties go to the lower layer index (stated in the file's order: a
stable sort). The file is read when the spec resolves, before any weights load; it must hold one finite score per
decoder layer of this LLM. The path runs to the end of the spec, or to a trailing ``+part`` / ``-part``.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction

PARTS = ("projector", "vision", "embed", "norm", "lm_head")
SUBLAYERS = ("attn", "mlp")
DEFAULT_PARTS = {"projector": True, "vision": False, "embed": False, "norm": False, "lm_head": False}
PAPER32 = (1, 5, 9, 13, 19, 23, 27, 31)
PLACEMENTS = ("uniform", "first", "last", "middle")
BY_SCORE = ("top", "bottom")

VALID_FORMS = (
    "valid region specs: full | none | paper32 (the paper's list, 32-layer LLMs only) | "
    "uniform<P> | first<P> | last<P> | middle<P> (P percent of the layers, 0 < P <= 100, e.g. uniform25) | "
    "uniform:<K> | first:<K> | last:<K> | middle:<K> (K layers) | layers:<i>,<j>,... (0-based) | "
    "top<P>@FILE | top:<K>@FILE | bottom<P>@FILE | bottom:<K>@FILE (the highest / lowest scoring layers of a "
    "launch/importance.py scores file) ; optionally .attn or .mlp: only that sub-layer of the selected layers "
    "(uniform25.mlp, layers:0,7.attn, top25.mlp@FILE) ; "
    "optionally followed by +part / -part with part in " + ", ".join(PARTS) + " (e.g. uniform25+lm_head)"
)


class RegionError(ValueError):
    """A region spec that cannot be resolved; the message names the problem and the valid forms."""

    def __init__(self, spec: str, problem: str):
        super().__init__(f"invalid region spec {spec!r}: {problem}. {VALID_FORMS}")


@dataclass(frozen=True)
class Region:
    """A resolved spec: the decoder layers that train and the switch of every other part."""

    spec: str
    num_layers: int
    layers: tuple[int, ...]
    parts: dict[str, bool] = field(default_factory=lambda: dict(DEFAULT_PARTS))
    sublayer: str | None = None  # "attn" | "mlp": only that sub-module of each selected layer trains

    def to_dict(self) -> dict:
        return {"spec": self.spec, "num_layers": self.num_layers, "layers": list(self.layers),
                "parts": dict(self.parts), "sublayer": self.sublayer}

    def explicit(self) -> str:
        """The spec that resolves to exactly this region (``layers:0,7.mlp+lm_head``), whatever it was written as; a
        region without layers is ``none`` with its parts."""
        body = ("layers:" + ",".join(map(str, self.layers)) if self.layers else "none") + (
            f".{self.sublayer}" if self.sublayer and self.layers else "")
        return body + "".join(("+" if on else "-") + part for part, on in self.parts.items()
                              if on != DEFAULT_PARTS[part])


def _count(spec: str, text: str, num_layers: int) -> int:
    if not re.fullmatch(r"\d+", text):
        raise RegionError(spec, f"layer count {text!r} is not a positive whole number")
    k = int(text)
    if not 1 <= k <= num_layers:
        raise RegionError(spec, f"layer count {k} is outside 1..{num_layers} (the LLM has {num_layers} layers)")
    return k


def _percent(spec: str, text: str, num_layers: int) -> int:
    if not re.fullmatch(r"-?\d+(\.\d+)?", text):
        raise RegionError(spec, f"percentage {text!r} is not a number")
    p = Fraction(text)
    if not 0 < p <= 100:
        raise RegionError(spec, f"percentage {text} is outside (0, 100]")
    k = int(p * num_layers / 100 + Fraction(1, 2))  # round half up, exact
    return max(1, k)


def uniform_indices(k: int, num_layers: int) -> list[int]:
    """k layers spread over num_layers: both ends included, gaps differ by at most one."""
    if k == 1:
        return [(num_layers - 1) // 2]
    return [int(Fraction(i * (num_layers - 1), k - 1) + Fraction(1, 2)) for i in range(k)]


def _place(placement: str, k: int, num_layers: int) -> list[int]:
    if placement == "uniform":
        return uniform_indices(k, num_layers)
    if placement == "first":
        return list(range(k))
    if placement == "last":
        return list(range(num_layers - k, num_layers))
    start = (num_layers - k) // 2  # middle
    return list(range(start, start + k))


def _size(spec: str, name: str, rest: str, num_layers: int, where: str = "") -> int:
    """k from what follows a selection's name: ``:K`` layers or ``P`` percent."""
    if rest.startswith(":"):
        return _count(spec, rest[1:], num_layers)
    if rest:
        return _percent(spec, rest, num_layers)
    raise RegionError(spec, f"{name} needs a percentage or :count{where}")


def load_scores(path: str, num_layers: int, what: str = "scores file") -> list[float]:
    """The per-layer scores of a launch/importance.py file, checked against the LLM's depth (ValueError if not)."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} does not exist (write one with launch/importance.py)")
    try:
        with open(path, encoding="utf-8") as f:
            scores = json.load(f).get("scores")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{what} {path} is not a launch/importance.py scores.json ({e})") from None
    if not isinstance(scores, list) or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in scores):
        raise ValueError(f"{what} {path} has no list of finite per-layer 'scores'")
    if len(scores) != num_layers:
        raise ValueError(f"{what} {path} scores {len(scores)} layers but this LLM has {num_layers}; score this "
                         "model's layers with launch/importance.py")
    return [float(x) for x in scores]


def read_scores(spec: str, path: str, num_layers: int) -> list[float]:
    try:
        return load_scores(path, num_layers)
    except ValueError as e:
        raise RegionError(spec, str(e)) from None


def by_score(scores: list[float], k: int, highest: bool) -> list[int]:
    """The k highest (or lowest) scoring layer indices, sorted; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i] if highest else scores[i], i))
    return sorted(order[:k])


def _layers(spec: str, body: str, num_layers: int, scores_file: str | None = None) -> list[int]:
    if scores_file is not None:
        which = next((w for w in BY_SCORE if body.startswith(w)), None)
        if which is None:
            raise RegionError(spec, f"@FILE follows top<P> / top:<K> / bottom<P> / bottom:<K> only, not {body!r}")
        k = _size(spec, which, body[len(which):], num_layers, " before @FILE")
        return by_score(read_scores(spec, scores_file, num_layers), k, which == "top")
    if body.startswith(BY_SCORE):
        raise RegionError(spec, f"{body!r} needs the scores file: {body}@FILE (launch/importance.py writes one)")
    if body == "full":
        return list(range(num_layers))
    if body == "none":
        return []
    if body == "paper32":
        if num_layers != 32:
            raise RegionError(spec, f"paper32 is defined for 32-layer LLMs only, this one has {num_layers}; "
                                    "use uniform25 for the same idea at any depth")
        return list(PAPER32)
    if body.startswith("layers:"):
        items = [s.strip() for s in body[len("layers:"):].split(",")]
        if not items or any(not re.fullmatch(r"\d+", s) for s in items):
            raise RegionError(spec, "layers: takes comma-separated 0-based whole numbers")
        idx = [int(s) for s in items]
        bad = [i for i in idx if i >= num_layers]
        if bad:
            raise RegionError(spec, f"layer index {bad[0]} is out of range 0..{num_layers - 1}")
        dup = sorted({i for i in idx if idx.count(i) > 1})
        if dup:
            raise RegionError(spec, f"layer index {dup[0]} is listed more than once")
        return sorted(idx)
    for placement in PLACEMENTS:
        if body.startswith(placement):
            return _place(placement, _size(spec, placement, body[len(placement):], num_layers), num_layers)
    raise RegionError(spec, f"unknown layer selection {body!r}")


def _split_scores(text: str) -> tuple[str | None, str]:
    """(scores file or None, the spec without it): the file keeps its case and its own + and - characters; it runs
    to the end of the spec or to a trailing +part / -part."""
    if "@" not in text:
        return None, text
    head, _, tail = text.partition("@")
    mods = re.search(r"((?:\s*[+-]\s*(?:" + "|".join(PARTS) + r"))*)\s*$", tail)
    return tail[:mods.start()].strip(), head + mods.group(1)


def scores_path(spec: str) -> str | None:
    """The scores file a ``top<P>@FILE`` spec reads (None for other specs)."""
    return _split_scores(spec.strip())[0] or None


def resolve(spec: str, num_layers: int, tied: bool = False) -> Region:
    """Resolve ``spec`` against an LLM of ``num_layers`` decoder layers.

    ``tied``: the model's input embeddings and LM head are one tensor (tie_word_embeddings). Then ``+embed`` and
    ``+lm_head`` both train it (both parts are switched together), and a spec that switches one on and the other
    off is refused: it cannot mean anything.

    Spaces around ``+`` / ``-`` and after the commas of ``layers:`` are allowed; anywhere else they are refused.
    Raises RegionError (a ValueError) on any invalid spec, and when the result trains nothing at all.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(spec, str):
        raise RegionError(repr(spec), "a region spec is a string")
    scores_file, text = _split_scores(spec.strip())
    if scores_file == "":
        raise RegionError(spec, "@ is followed by no scores file")
    text = re.sub(r"\s*([+,:-])\s*", r"\1", text.lower())  # "uniform25 + lm_head" reads as written
    if not text:
        raise RegionError(spec, "the spec is empty")
    if re.search(r"\s", text):
        raise RegionError(spec, "it contains spaces inside a name or number (spaces may only stand around + / - and "
                                "after the commas of layers:)")
    tokens = re.split(r"([+-])(?=[a-z_])", text)  # a sign before a letter starts a part
    body, mods = tokens[0], tokens[1:]
    body, sublayer = _split_sublayer(spec, body)
    parts = dict(DEFAULT_PARTS)
    given: dict[str, bool] = {}
    for sign, name in zip(mods[::2], mods[1::2]):
        if name not in PARTS:
            raise RegionError(spec, f"unknown part {name!r}")
        parts[name] = given[name] = sign == "+"
    if tied:
        if "embed" in given and "lm_head" in given and given["embed"] != given["lm_head"]:
            raise RegionError(spec, "this model ties its input embeddings and LM head (one tensor), so one cannot "
                                    "train while the other stays frozen; use +embed (or +lm_head) to train the tied "
                                    "tensor, or neither")
        parts["embed"] = parts["lm_head"] = parts["embed"] or parts["lm_head"]
    layers = _layers(spec, body, num_layers, scores_file)
    if sublayer and not layers:
        raise RegionError(spec, f".{sublayer} needs decoder layers to take it from, and {body!r} selects none")
    if not layers and not any(parts.values()):
        raise RegionError(spec, "it selects nothing to train")
    return Region(spec=spec.strip(), num_layers=num_layers, layers=tuple(layers), parts=parts, sublayer=sublayer)


def _split_sublayer(spec: str, body: str) -> tuple[str, str | None]:
    """(the layer selection, its sub-layer or None) of ``body``: a trailing ``.name`` that is not part of a number."""
    m = re.fullmatch(r"(.*?)\.([a-z_][a-z0-9_]*)((?:\.[a-z_][a-z0-9_]*)*)", body)
    if m is None:
        return body, None
    if m.group(3):
        raise RegionError(spec, f"one sub-layer at most ({', '.join(SUBLAYERS)}), not {m.group(2)}{m.group(3)}")
    if m.group(2) not in SUBLAYERS:
        raise RegionError(spec, f"unknown sub-layer {m.group(2)!r} (valid: {', '.join(SUBLAYERS)})")
    return m.group(1), m.group(2)
