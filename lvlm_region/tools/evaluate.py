"""Standalone evaluation of a model directory (launch/evaluate.py): held-out loss, answer accuracy and examples,
with the code and the numbers of a run's end-of-run evaluation, on 1..N ranks (ZeRO-3: partitioned weights).

Writes OUTPUT_DIR/eval.json and a short eval.md. A model trained here is evaluated with the template, aspect
handling and length limit its run.json records (unless given), so it sees the prompts it was trained on.
"""
from __future__ import annotations

import json
import logging
import os
import time

from ..config import RunConfig
from ..infra import outputs
from ..model.load import load_model
from ..train import engine
from ..train.held_out import evaluate
from ..train.run_setup import obtain_data, setup

log = logging.getLogger(__name__)

# Settings a model's run.json supplies when the command line leaves them unset (how it was trained).
FROM_RUN = ("template", "image_aspect_ratio", "max_length")


def trained_with(model_dir: str) -> dict | None:
    """The run.json of the run that wrote ``model_dir``, when there is one."""
    path = os.path.join(model_dir, "run.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def trained_settings(model_dir: str) -> dict:
    """The FROM_RUN settings ``model_dir`` was trained with: its run.json's, or for a model launch/prune.py wrote, those
    its prune.json carried over from the source (empty when neither says)."""
    run = trained_with(model_dir)
    if run is not None:
        return {k: run["config"].get(k) for k in FROM_RUN}
    path = os.path.join(model_dir, "prune.json")
    if os.path.isfile(path):
        with open(path) as f:
            return dict(json.load(f).get("settings") or {})
    return {}


def evaluation_config(model: str, data: str, output_dir: str | None = None, **flags) -> RunConfig:
    """The run config of an evaluation: ``data`` is the held-out set; unset FROM_RUN fields come from the model's
    run.json (a pruned model's: its source's). ``output_dir`` defaults to MODEL/eval."""
    given = {k: v for k, v in flags.items() if v is not None}
    given.update({k: v for k, v in trained_settings(model).items() if k not in given and v is not None})
    return RunConfig(stage="sft", model=model, data=data, eval_data=data, export_model=False,
                     output_dir=output_dir or os.path.join(model, "eval"), **given)


def evaluate_model(cfg: RunConfig) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.eval_data``; returns what eval.json holds (written by rank 0)."""
    start = time.perf_counter()
    check_output(cfg)
    s = setup(cfg, trains=False)
    eval_ds, folder = obtain_data(cfg.eval_data, cfg.image_folder, "eval", s)
    dtype = engine.torch_dtype(s.precision)
    loading = engine.PartitionedLoading(s.ds_config)  # ZeRO-3: built and loaded in partitions
    model = load_model(cfg.model_path, dtype, s.attn)
    loading.close()
    runner = engine.inference_model(model, s.ds_config)
    result = evaluate(runner, eval_ds, folder, s, cfg, dtype, engine.device())
    if cfg.text_eval_data:  # text retention: the same evaluation on text-only questions
        result["text_eval"] = evaluate(runner, obtain_data(cfg.text_eval_data, None, "text", s)[0], "", s, cfg,
                                       dtype, engine.device())
    run = trained_with(cfg.model_path)
    out = {"model": os.path.abspath(cfg.model_path), "data": os.path.abspath(cfg.eval_data),
           "text_data": cfg.text_eval_data and os.path.abspath(cfg.text_eval_data),
           "trained": None if run is None else {
               "stage": run["config"]["stage"], "region": run.get("region"), "tuner": run["config"].get("tuner"),
               "parameters": run.get("parameters"), "status": run.get("status"),
               "eval_at_end": run.get("eval", {}).get("accuracy")},
           "template": cfg.template, "image_aspect_ratio": cfg.image_aspect_ratio, "max_length": cfg.max_length,
           "world_size": engine.world_size(), "zero_stage": engine.zero_stage(s.ds_config), "precision": s.precision,
           **result, "seconds": time.perf_counter() - start}
    if engine.rank() == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        outputs.write_json_atomic(os.path.join(cfg.output_dir, "eval.json"), out)
        with open(os.path.join(cfg.output_dir, "eval.md"), "w") as f:
            f.write(report_md(out))
        log.info("held-out loss %.4f | answer accuracy %.3f (%d/%d) -> %s", out["loss"], out["accuracy"],
                 out["correct"], out["samples"], os.path.join(cfg.output_dir, "eval.json"))
    engine.barrier()
    return out


def check_output(cfg: RunConfig) -> None:
    """Refuse, before any work, an output directory whose eval.json / eval.md this program did not write, or that
    holds the evaluation of another model or data set (a second data set would replace the first's numbers)."""
    path = os.path.join(cfg.output_dir, "eval.json")
    if os.path.isfile(os.path.join(cfg.output_dir, "eval.md")) and not os.path.isfile(path):
        raise ValueError(f"--output-dir {cfg.output_dir} holds an eval.md but no eval.json, so it is not an earlier "
                         "evaluation of this program; give a new --output-dir (nothing was written)")
    if not os.path.lexists(path):
        return
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError):
        before = None
    if not isinstance(before, dict) or not {"model", "data", "accuracy"} <= set(before):
        raise ValueError(f"--output-dir {cfg.output_dir} holds an eval.json this program did not write; it would be "
                         "replaced. Give a new --output-dir (nothing was written)")
    now = {"model": os.path.abspath(cfg.model_path), "data": os.path.abspath(cfg.eval_data),
           "text_data": cfg.text_eval_data and os.path.abspath(cfg.text_eval_data)}
    other = [f"{k} {before.get(k)} (now {v})" for k, v in now.items() if before.get(k) != v]
    if other:
        raise ValueError(f"--output-dir {cfg.output_dir} holds the evaluation of another model or data set "
                         f"({'; '.join(other)}), which this one would replace; give this evaluation its own "
                         "--output-dir (nothing was written)")


def report_md(e: dict) -> str:
    """eval.md: the numbers, what was evaluated, and the right and wrong examples."""
    t = e["trained"]
    lines = [f"# Evaluation of `{e['model']}`", "",
             f"Data `{e['data']}`: {e['samples']} samples. **Answer accuracy {e['accuracy']:.3f}** "
             f"({e['correct']}/{e['samples']}, normalised exact match of the greedy answer), held-out token loss "
             f"{e['loss']:.4f}.", "",
             f"Template `{e['template']}`, image aspect `{e['image_aspect_ratio']}`, {e['world_size']} rank(s), "
             f"ZeRO stage {e['zero_stage']}, {e['precision']}, {e['seconds']:.1f} s."]
    if t is not None:
        region = (t.get("region") or {}).get("spec")
        trainable = ((t.get("parameters") or {}).get("all") or {}).get("trainable")
        lines += ["", f"Trained here: stage {t['stage']}, region `{region}`, tuner {t['tuner']}, "
                      f"{trainable} trainable parameters; its end-of-run accuracy was {t['eval_at_end']}."]
    if e["by_category"]:
        lines += ["", "| category | accuracy | correct / samples |", "|---|---|---|"]
        lines += [f"| {k} | {v['accuracy']:.3f} | {v['correct']}/{v['samples']} |" for k, v in e["by_category"].items()]
    if e.get("text_eval"):
        t = e["text_eval"]
        lines += ["", f"Text retention (`{e['text_data']}`, text-only questions): accuracy {t['accuracy']:.3f} "
                      f"({t['correct']}/{t['samples']})."]
    for name in ("right", "wrong"):
        lines += ["", f"## {name.capitalize()} answers", "", "| id | question | reference | output |",
                  "|---|---|---|---|"]
        lines += [f"| {r['id']} | {_cell(r['question'])} | {_cell(r['reference'])} | {_cell(r['output'])} |"
                  for r in e[name]]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
