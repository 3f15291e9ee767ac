"""Visual-region-based layer pruning (launch/prune.py): drop the K lowest-scoring decoder layers outside a protected
region (by default the region the model was trained with) and write a transformers checkpoint that plain
``from_pretrained`` loads.

The source model is loaded once, in its saved dtype. For each K the decoder's layer list is replaced by the kept
layers (the same module objects, no copy), every submodule's ``layer_idx`` is renumbered (the KV cache is indexed by
it), and the text config's ``num_hidden_layers``, every per-layer list (``layer_types`` ...) and the fields that
count or index layers (``families.LAYER_FIELDS``) are cut to match; the view is saved and undone. Tokenizer, processor
and chat-template files are copied byte for byte. ``prune.json`` records the source, the scores, the dropped layers
and the kept mapping (new layer i is source layer ``kept[i]``), and the settings the source was evaluated with.

With ``--eval-data`` the source and every pruned model are evaluated by launch/evaluate.py (one process each) and
their greedy generation speed is measured in this process, one model after another on the same prompts, into
``prune_report.{md,json}``.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel

from ..infra import outputs
from ..model import families, regions
from .evaluate import trained_settings, trained_with
from .importance import check_layers

log = logging.getLogger(__name__)

PRUNE_FILE = "prune.json"  # in every pruned model directory
SWEEP_FILE = "prune_sweep.json"  # in the output directory of several K (one model per K below it)
STAGING = ".prune-staging"  # written first into OUTPUT.partial: a leftover holding it is an earlier attempt's
MARKERS = (PRUNE_FILE, SWEEP_FILE)  # an earlier output of this program, which a new one may replace
EVALUATE = Path(__file__).resolve().parents[2] / "launch" / "evaluate.py"
# What a checkpoint's tokenizer, processor and chat template are made of (copied as they are).
PROCESSOR_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                   "chat_template.*", "preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json")


class PruneError(ValueError):
    """A pruning that cannot run as asked, with what to change."""


@dataclass
class Plan:
    """What will be dropped, decided from configs and the scores file alone (before any weights load)."""

    model: str
    scores_file: str
    scores: list[float]
    method: str | None  # the scores file's method (bi, delta)
    depth: int
    protect: str  # the protected region's spec, or "none"
    protected: list[int]  # source layer indices never dropped
    protect_from: str  # where the protected region came from (run.json, prune.json, --protect)
    drops: list[int]
    pinned: list[int] = field(default_factory=list)  # layers the architecture refers to by index (families)
    pinned_why: str = ""

    def dropped(self, k: int) -> list[int]:
        """The k lowest-scoring layers outside the protected region, sorted; among equal scores the lower index
        goes first. A larger k drops a superset."""
        candidates = [i for i in range(self.depth) if i not in self.protected and i not in self.pinned]
        return sorted(sorted(candidates, key=lambda i: (self.scores[i], i))[:k])

    def kept(self, k: int) -> list[int]:
        gone = set(self.dropped(k))
        return [i for i in range(self.depth) if i not in gone]


def parse_drops(text: str) -> list[int]:
    """``--drop 1,2,3`` -> [1, 2, 3] (distinct positive whole numbers, in increasing order)."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t.isdigit() or int(t) < 1 for t in items):
        raise PruneError(f"--drop {text!r}: give how many layers to drop as positive whole numbers, e.g. --drop 2 or "
                         "--drop 1,2,3 (one model each)")
    drops = [int(t) for t in items]
    if len(set(drops)) != len(drops):
        raise PruneError(f"--drop {text!r} names a count twice")
    return sorted(drops)


def _protected(model: str, protect: str | None, depth: int) -> tuple[str, list[int], str]:
    """(spec, source layer indices, where it came from) of the layers pruning must keep."""
    if protect is not None:
        if protect.strip() == "none":
            return "none", [], "--protect none"
        try:
            return protect, list(regions.resolve(protect, depth).layers), "--protect"
        except ValueError as e:
            raise PruneError(f"--protect: {e}") from None
    run = trained_with(model)
    if run is not None and run.get("region"):
        region = run["region"]
        if region.get("num_layers", depth) != depth:
            raise PruneError(f"{model}/run.json records a region over {region.get('num_layers')} layers but the model "
                             f"has {depth}; give --protect SPEC or --protect none")
        return region["spec"], list(region["layers"]), os.path.join(os.path.abspath(model), "run.json")
    pruned = read_prune(model)
    if pruned is not None and pruned.get("protected"):
        p = pruned["protected"]
        return p["spec"], list(p["layers_after"]), os.path.join(os.path.abspath(model), PRUNE_FILE)
    raise PruneError(f"--model {model} has no run.json (or prune.json) recording the region it was trained with, "
                     "so there is no region to protect: give --protect SPEC (e.g. --protect uniform25 or "
                     "--protect layers:0,3,7) or --protect none to allow dropping any layer")


def make_plan(model: str, scores_file: str, drops: list[int], protect: str | None) -> Plan:
    """Check everything pruning needs before any weights load: the model's depth, the scores, the protected region,
    and that every K leaves a layer to keep."""
    depth = check_layers(model)
    scores = regions.load_scores(scores_file, depth, "--scores")
    with open(scores_file) as f:
        meta = json.load(f)
    spec, protected, source = _protected(model, protect, depth)
    from transformers import AutoConfig
    pinned, why = families.pinned_layers(AutoConfig.from_pretrained(model))
    pinned = sorted(set(pinned) - set(protected))
    free = depth - len(protected) - len(pinned)
    for k in drops:
        if k > free or k >= depth:
            most = min(free, depth - 1)
            also = f", and {len(pinned)} more it keeps because {why} (layers {pinned})" if pinned else ""
            raise PruneError(f"--drop {k}: the model has {depth} decoder layers, {len(protected)} of them in the "
                             f"protected region {spec!r} ({source}){also}, so at most {most} can be dropped; give a "
                             "smaller K or another --protect")
    if pinned:
        log.info("pruning keeps decoder layers %s besides the protected region: %s", pinned, why)
    if meta.get("model") and os.path.realpath(meta["model"]) != os.path.realpath(model):
        log.warning("--scores %s scored %s, not --model %s: pruning by another model's scores", scores_file,
                    meta["model"], model)
    return Plan(os.path.abspath(model), os.path.abspath(scores_file), scores, meta.get("method"), depth, spec,
                sorted(protected), source, drops, pinned, why)


def read_prune(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, PRUNE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _per_layer_lists(text_config, depth: int) -> list[str]:
    """The text config's attributes that hold one entry per decoder layer (layer_types, ...)."""
    return sorted(k for k, v in text_config.to_dict().items()
                  if isinstance(v, (list, tuple)) and len(v) == depth and k != "architectures")


@contextlib.contextmanager
def pruned_view(model: PreTrainedModel, kept: list[int]):
    """``model`` with only the decoder layers ``kept`` (source indices, in order), renumbered, and its text config
    to match; restored on exit. Yields the names of the config fields that were cut."""
    decoder = model.get_decoder()
    layers = decoder.layers
    text = model.config.get_text_config()
    depth = len(layers)
    lists = _per_layer_lists(text, depth)
    before = {k: getattr(text, k) for k in ("num_hidden_layers", *families.LAYER_FIELDS, *lists) if hasattr(text, k)}
    numbered = [(m, i) for i, layer in enumerate(layers) for m in layer.modules()
                if isinstance(getattr(m, "layer_idx", None), int)]
    try:
        decoder.layers = torch.nn.ModuleList([layers[i] for i in kept])
        for new, old in enumerate(kept):
            for m in layers[old].modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new
        text.num_hidden_layers = len(kept)
        for k in lists:
            setattr(text, k, [before[k][i] for i in kept])
        changed = list(lists) + families.cut_layer_fields(text, kept, before)
        yield changed
    finally:
        decoder.layers = layers
        for m, i in numbered:
            m.layer_idx = i
        for k, v in before.items():
            setattr(text, k, v)


def copy_processor(source: str, out: str) -> list[str]:
    """Copy the tokenizer, processor and chat-template files of ``source`` into ``out``; returns their names."""
    names = sorted({os.path.basename(p) for pattern in PROCESSOR_FILES
                    for p in glob.glob(os.path.join(source, pattern)) if os.path.isfile(p)})
    for name in names:
        shutil.copy2(os.path.join(source, name), os.path.join(out, name))
    return names


def parameter_total(model: PreTrainedModel) -> int:
    """All parameters of ``model`` (or a layer), a tied tensor once; trainable.count_parameters splits them by part."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # a tied tensor once


def prune(plan: Plan, output: str) -> list[dict]:
    """Write one pruned model per K of ``plan`` (``output`` itself for one K, ``output/drop<K>`` for several);
    returns a record per K. The models are built in a staging directory beside ``output`` that replaces it at the
    end, so a crash leaves no half-written model under the output's name."""
    check_output(output, plan)
    model = AutoModelForImageTextToText.from_pretrained(plan.model, dtype="auto")  # as saved: no precision change
    log.info("loaded %s (%s) to drop %s of its %d decoder layers", plan.model, next(model.parameters()).dtype,
             " / ".join(map(str, plan.drops)), plan.depth)
    source_params = parameter_total(model)
    layer_params = [parameter_total(layer) for layer in model.get_decoder().layers]
    staged = staging_dir(output)
    if os.path.lexists(staged):  # an earlier attempt's (check_output made sure)
        shutil.rmtree(staged)
    os.makedirs(staged)
    open(os.path.join(staged, STAGING), "w").close()  # first: what makes a leftover of this directory ours
    many = len(plan.drops) > 1
    records = []
    for k in plan.drops:
        name = f"drop{k}" if many else "."
        out = os.path.normpath(os.path.join(staged, name))
        kept, dropped = plan.kept(k), plan.dropped(k)
        with pruned_view(model, kept) as changed:
            model.save_pretrained(out)
        copied = copy_processor(plan.model, out)
        index = {old: new for new, old in enumerate(kept)}
        record = {
            "source": plan.model, "scores_file": plan.scores_file, "method": plan.method, "drop": k,
            "dropped": dropped, "dropped_scores": [plan.scores[i] for i in dropped], "kept": kept,
            "layers_before": plan.depth, "layers_after": len(kept),
            "protected": {"spec": plan.protect, "from": plan.protect_from, "layers": plan.protected,
                          "layers_after": [index[i] for i in plan.protected]},
            "pinned": {"layers": plan.pinned, "why": plan.pinned_why},
            "parameters_before": source_params, "parameters": source_params - sum(layer_params[i] for i in dropped),
            "config_fields_cut": ["num_hidden_layers", *changed], "copied": copied,
            "settings": trained_settings(plan.model)}
        outputs.write_json_atomic(os.path.join(out, PRUNE_FILE), record)
        log.info("drop %d: layers %s removed (scores %s); %d layers, %d parameters -> %s", k, dropped,
                 ", ".join(f"{plan.scores[i]:.4g}" for i in dropped), len(kept), record["parameters"],
                 os.path.join(output, name) if many else output)
        records.append({**record, "dir": os.path.normpath(os.path.join(os.path.abspath(output), name))})
    os.remove(os.path.join(staged, STAGING))
    if many:
        outputs.write_json_atomic(os.path.join(staged, SWEEP_FILE), {"source": plan.model, "drops": plan.drops,
                                                                        "models": [r["dir"] for r in records]})
    outputs.replace_dir(staged, output, MARKERS, "launch/prune.py output", "--output")
    return records


def staging_dir(output: str) -> str:
    """Where the models are built before they replace ``output``: OUTPUT.partial beside it."""
    return os.path.abspath(output).rstrip(os.sep) + ".partial"


def check_output(output: str, plan: Plan) -> None:
    """Refuse an output, or its staging directory OUTPUT.partial (removed before the work starts), that is or holds
    the model or the scores file, or that holds anything this program did not write: both are replaced whole."""
    staged = staging_dir(output)
    for flag, where in (("--output", output), (f"--output's staging directory {staged}:", staged)):
        for what, path in (("--model", plan.model), ("--scores", plan.scores_file)):
            if outputs.inside(path, where):
                raise PruneError(f"{flag} {where} contains {what} {path}; it is replaced whole, so give an --output "
                                 "outside the inputs")
    outputs.check_replaceable(output, MARKERS, "launch/prune.py output", "--output")
    outputs.check_replaceable(staged, (STAGING, *MARKERS), "launch/prune.py staging directory",
                              f"--output {output}: its staging directory")


def evaluate_all(rows: list[dict], eval_args: list[str]) -> None:
    """launch/evaluate.py on each row's model (one process each) into row['eval_dir']; adds eval.json's numbers."""
    for row in rows:
        # a pruned model is evaluated with its source's template, aspect and length (prune.json carries them)
        cmd = [sys.executable, str(EVALUATE), "--model", row["dir"], "--output-dir", row["eval_dir"], *eval_args]
        log.info("evaluating %s: %s", row["name"], " ".join(cmd))
        if subprocess.run(cmd).returncode != 0:  # our working directory: relative flags mean the same there
            raise RuntimeError(f"evaluating {row['dir']} failed (its log is above); the pruned models are written")
        with open(os.path.join(row["eval_dir"], "eval.json")) as f:
            e = json.load(f)
        row.update(accuracy=e["accuracy"], loss=e["loss"], correct=e["correct"], samples=e["samples"],
                   text_accuracy=(e.get("text_eval") or {}).get("accuracy"))


@torch.no_grad()
def generation_speed(rows: list[dict], cfg, new_tokens: int, repeats: int) -> dict:
    """Greedy generation tokens/s of every row's model on the same prompt batch (the first micro-batch of
    ``cfg.eval_data``), exactly ``new_tokens`` new tokens per prompt (end-of-sequence suppressed), in this process,
    one model after another: a warm-up call, then the median of ``repeats`` timed calls. Adds ``tokens_per_s``."""
    from ..train import engine
    from ..data.batches import run_loader, to_device
    from ..train.held_out import PromptDataset
    from ..model.load import load_model
    from ..train.run_setup import obtain_data, setup

    s = setup(cfg, trains=False)
    ds, folder = obtain_data(cfg.eval_data, cfg.image_folder, "speed", s)
    ds = ds.select(range(min(cfg.micro_batch, len(ds))))
    layout = s.encoding.layout
    prompts = PromptDataset(ds, folder, s.load_image, s.encoding, s.tokenizer)
    batch = next(iter(run_loader(prompts, cfg, s.tokenizer.pad_token_id, layout.dummy(), 0, 1, shuffle=False,
                                 drop_last=False, left_pad=True)))
    for k in ("index", "answer", "question", "id", "category"):
        batch.pop(k)
    dtype, device = engine.torch_dtype(s.precision), engine.device()
    batch = to_device(batch, device, dtype)
    rows_n = int(batch["input_ids"].shape[0])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for row in rows:
        model = load_model(row["dir"], dtype, s.attn).to(device).eval()
        kwargs = dict(**layout.model_inputs(batch), do_sample=False, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, pad_token_id=s.tokenizer.pad_token_id)
        model.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            out = model.generate(**kwargs)
            sync()
            times.append(time.perf_counter() - start)
        made = int(out.shape[1] - batch["input_ids"].shape[1])
        row["tokens_per_s"] = rows_n * made / statistics.median(times)
        row["generate_s"] = times
        log.info("%s: %.1f generated tokens/s (%d prompts x %d tokens, median of %d)", row["name"],
                 row["tokens_per_s"], rows_n, made, repeats)
        del model
    return {"prompts": rows_n, "new_tokens": new_tokens, "repeats": repeats, "device": str(device),
            "precision": s.precision, "attn": s.attn}


def report(plan: Plan, rows: list[dict], speed: dict, output: str, eval_data: str) -> dict:
    """prune_report.json and .md in ``output``: a row per model (the source first), accuracy and speed relative to
    the source's."""
    base = rows[0]
    for r in rows:
        r["relative_accuracy"] = r["accuracy"] / base["accuracy"] if base["accuracy"] else None
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    out = {"source": plan.model, "scores_file": plan.scores_file, "method": plan.method,
           "protected": {"spec": plan.protect, "from": plan.protect_from, "layers": plan.protected},
           "pinned": {"layers": plan.pinned, "why": plan.pinned_why}, "eval_data": os.path.abspath(eval_data),
           "speed": speed, "rows": rows}
    outputs.write_json_atomic(os.path.join(output, "prune_report.json"), out)
    lines = [f"# Pruning `{plan.model}`", "",
             f"Layers dropped by {plan.method or 'the'} scores of `{plan.scores_file}` (lowest first), never one of "
             f"the protected region `{plan.protect}` {plan.protected} ({plan.protect_from})"
             + (f" nor layers {plan.pinned} ({plan.pinned_why})" if plan.pinned else "") + ". Accuracy: "
             f"launch/evaluate.py on `{out['eval_data']}`. Generation: {speed['prompts']} prompts x "
             f"{speed['new_tokens']} new tokens, greedy with the KV cache, median of {speed['repeats']} after a "
             f"warm-up, every model in one process one after another ({speed['device']}, {speed['precision']}, "
             f"{speed['attn']}).", "",
             "| model | layers dropped | layers | parameters | accuracy | vs unpruned | text accuracy | loss | "
             "tokens/s | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        text = "" if r["text_accuracy"] is None else f"{r['text_accuracy']:.3f}"
        rel = "" if r["relative_accuracy"] is None else f"{r['relative_accuracy']:.3f}"
        lines.append(f"| {r['name']} | {r['dropped'] or '-'} | {r['layers']} | {r['parameters']:,} | "
                     f"{r['accuracy']:.3f} | {rel} | {text} | {r['loss']:.4f} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f} |")
    with open(os.path.join(output, "prune_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def run(model: str, scores_file: str, drops: list[int], protect: str | None, output: str,
        eval_data: str | None = None, eval_flags: dict | None = None, speed_tokens: int = 32,
        speed_repeats: int = 3) -> dict:
    """launch/prune.py: plan (no weights), prune, and with ``eval_data`` evaluate and time every model and report.

    ``eval_flags``: RunConfig fields for the evaluations ({"text_eval_data": ..., "precision": ...}), given to
    launch/evaluate.py as flags and to the speed measurement's run config."""
    plan = make_plan(model, scores_file, drops, protect)
    if eval_data is not None and not os.path.exists(eval_data):
        raise FileNotFoundError(f"--eval-data {eval_data} does not exist")
    records = prune(plan, output)
    result = {"plan": {"protect": plan.protect, "protected": plan.protected, "from": plan.protect_from},
              "models": records}
    if eval_data is None:
        return result
    from .evaluate import evaluation_config

    flags = {k: v for k, v in (eval_flags or {}).items() if v is not None and v is not False}
    args = ["--data", os.path.abspath(eval_data)]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    first = records[0]
    rows = [{"name": "unpruned", "dir": plan.model, "eval_dir": os.path.join(os.path.abspath(output), "eval-unpruned"),
             "dropped": [], "layers": plan.depth, "parameters": first["parameters_before"]}]
    rows += [{"name": f"drop{r['drop']}", "dir": r["dir"], "eval_dir": os.path.join(r["dir"], "eval"),
              "dropped": r["dropped"], "layers": r["layers_after"], "parameters": r["parameters"]} for r in records]
    evaluate_all(rows, args)
    cfg = evaluation_config(plan.model, os.path.abspath(eval_data), os.path.join(os.path.abspath(output), "speed"),
                            **{k: v for k, v in flags.items() if k != "text_eval_data"})
    speed = generation_speed(rows, cfg, speed_tokens, speed_repeats)
    result["report"] = report(plan, rows, speed, output, eval_data)
    return result
