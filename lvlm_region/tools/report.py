"""Cost report: what a selective run saved against full tuning, from measured run directories only.

Reads each run's ``run.json`` (config, region, parameter counts, timing, accumulated wall / GPU time, eval) and
``metrics.jsonl`` (loss curve); writes report.json, report.csv, report.md (with PNG plots beside it) and a
self-contained report.html (plots embedded). Every figure is a measurement of the runs given, except the
projection, which is labelled as such and says what it was computed from.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from dataclasses import dataclass

from ..infra import outputs
from ..infra.timing import PEAK_TFLOPS


class ReportError(ValueError):
    """A run directory the report cannot use, with what is wrong and what to do."""


@dataclass
class Projection:
    samples: int  # e.g. 665_000 for LLaVA-665K
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "A100"  # a key of timing.PEAK_TFLOPS
    assumed_mfu: float = 0.4  # used only when the runs were measured on other hardware


def load_run(path: str) -> dict:
    """One row of the report from a run directory; a clear ReportError when it cannot be read."""
    if not os.path.isdir(path):
        raise ReportError(f"{path}: no such directory")
    rj = os.path.join(path, "run.json")
    if not os.path.isfile(rj):
        raise ReportError(f"{path}: no run.json; not a run directory of lvlm_region, or the run failed before "
                          f"its first step (see its log)")
    try:
        run = json.load(open(rj))
    except json.JSONDecodeError as e:
        raise ReportError(f"{rj}: not valid JSON ({e})") from e
    curve = []
    mj = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(mj):
        try:
            records = outputs.read_jsonl(mj)  # a torn last line (a run killed mid-write) is dropped with a warning
        except ValueError as e:
            raise ReportError(str(e)) from e
        curve = [(rec["step"], rec["loss"]) for rec in records if "loss" in rec]
    t, time_ = run.get("timing", {}), run.get("time", {})
    cfg, params = run.get("config", {}), run.get("parameters", {}).get("all", {})
    status = run.get("status", "unknown")
    row = {
        "name": os.path.basename(os.path.normpath(path)), "path": path,
        "status": {"running": "in progress (partial figures)", "interrupted": "interrupted (resumable)"}.get(status,
                                                                                                              status),
        "region": region_label(run), "layers": run.get("region", {}).get("layers"),
        "tuner": cfg.get("tuner", "full"), "trainable_params": params.get("trainable"),
        "total_params": params.get("total"), "hardware": run.get("device_name"), "ranks": run.get("world_size"),
        "steps": run.get("steps_done", curve[-1][0] if curve else 0), "planned_steps": run.get("steps"),
        "tokens": t.get("tokens_total"), "samples": t.get("samples_total"),
        "wall_hours": time_["elapsed_s"] / 3600 if "elapsed_s" in time_ else None,
        "gpu_hours": time_["gpu_seconds"] / 3600 if "gpu_seconds" in time_ else None,
        "tokens_per_s_per_gpu": t.get("tokens_per_s_per_gpu"), "mfu": t.get("mfu"),
        "step_seconds": t.get("step_seconds"), "phase_seconds": t.get("phase_seconds"),
        "model_tflops_per_step": t.get("model_tflops_per_step"),
        "hardware_tflops_per_step": t.get("hardware_tflops_per_step"),
        "peak_memory_gb": t.get("peak_memory_gb_rank0"), "memory_estimate_gb": t.get("memory_estimate_gb"),
        # the mean over the last logged window (run.json final_loss_mean); the last step's loss for earlier runs
        "final_loss": (run.get("final_loss_mean") or {}).get("value", run.get("final_loss")),
        "accuracy": run.get("eval", {}).get("accuracy"),
        "eval_loss": run.get("eval", {}).get("loss"), "seed": cfg.get("seed"),
        "accuracy_by_category": category_accuracy(run.get("eval", {})),
        "text_retention": run.get("text_eval", {}).get("accuracy"),
        "grad_ckpt": cfg.get("grad_ckpt"), "micro_batch": cfg.get("micro_batch"), "zero": cfg.get("zero"),
        "curve": curve, "compare_full": run.get("compare_full"),
    }
    return row


def _ratio(a, b):
    return a / b if a is not None and b else None


def compare(row: dict, base: dict, price: float) -> dict:
    """A run against the full-tuning baseline: GPU-hours for the same number of steps, step time, memory."""
    notes = []
    base_gpu_h = base["gpu_hours"]
    if base_gpu_h is not None and row["steps"] and base["steps"] and row["steps"] != base["steps"]:
        base_gpu_h = base_gpu_h * row["steps"] / base["steps"]
        notes.append(f"baseline GPU-hours scaled from its {base['steps']} to this run's {row['steps']} steps")
    for key in ("micro_batch", "zero", "grad_ckpt"):
        if row[key] != base[key]:
            notes.append(f"{key} differs from the baseline ({row[key]} vs {base[key]}): a system saving, not like "
                         "for like")
    saved = base_gpu_h - row["gpu_hours"] if base_gpu_h is not None and row["gpu_hours"] is not None else None
    return {
        "run": row["name"], "baseline": base["name"],
        "baseline_gpu_hours": base_gpu_h, "gpu_hours": row["gpu_hours"], "gpu_hours_saved": saved,
        "gpu_hours_saved_pct": 100 * saved / base_gpu_h if saved is not None and base_gpu_h else None,
        "cost_saved": saved * price if saved is not None else None, "price_per_gpu_hour": price,
        "step_time_ratio": _ratio(row["step_seconds"], base["step_seconds"]),
        "ideal_ratio": _ratio(row["hardware_tflops_per_step"], base["hardware_tflops_per_step"]),
        "peak_memory_saved_gb": (base["peak_memory_gb"] - row["peak_memory_gb"]
                                 if base["peak_memory_gb"] is not None and row["peak_memory_gb"] is not None else None),
        "estimated_memory_saved_gb": (
            base["memory_estimate_gb"] - row["memory_estimate_gb"]
            if base["memory_estimate_gb"] is not None and row["memory_estimate_gb"] is not None else None),
        "accuracy_delta": (row["accuracy"] - base["accuracy"]
                           if row["accuracy"] is not None and base["accuracy"] is not None else None),
        "notes": notes, "flags": trust_flags(row, base),
    }


REMEDY = ("measure both arms in one allocation, back to back: launch/sft.py --compare-full (the full-tuning arm is "
          "timed on the same GPUs right after the run)")
# How far a like-for-like measurement may stray from the FLOP model before the comparison is flagged: the measured
# step-time ratio lies between the FLOP model's ratio (all work scales) and 1 (fixed costs dominate).
RATIO_SLACK = (0.85, 1.15)
MFU_SPREAD = 2.0  # each run's MFU counts its own FLOPs: like for like they differ by much less than this
FORWARD_SPREAD = 1.25  # the forward pass is the same work in both arms


def trust_flags(row: dict, base: dict) -> list[dict]:
    """Why a run's comparison with the baseline cannot be trusted, each with its likely cause and the remedy."""
    flags = []

    def flag(check: str, detail: str, cause: str) -> None:
        flags.append({"check": check, "detail": detail, "cause": cause, "remedy": REMEDY})

    if row["hardware"] != base["hardware"]:
        flag("hardware", f"measured on {row['hardware']}, the baseline on {base['hardware']}",
             "different GPUs (another node type) run at other speeds")
    if row["ranks"] != base["ranks"]:
        flag("world size", f"{row['ranks']} ranks, the baseline {base['ranks']}",
             "other communication and per-GPU batch: the step times do not compare")
    measured = _ratio(row["step_seconds"], base["step_seconds"])
    ideal = _ratio(row["hardware_tflops_per_step"], base["hardware_tflops_per_step"])
    if measured is not None and ideal is not None and not (
            ideal * RATIO_SLACK[0] <= measured <= max(1.0, ideal) * RATIO_SLACK[1]):
        flag("step-time ratio", f"measured {measured:.3g} against the FLOP model's {ideal:.3g} (like for like it lies "
                                f"between {ideal * RATIO_SLACK[0]:.3g} and {max(1.0, ideal) * RATIO_SLACK[1]:.3g})",
             "the runs did not run under the same conditions: another job on the node, a straggler rank, "
             "throttling, or other data")
    if row["mfu"] and base["mfu"] and not 1 / MFU_SPREAD <= row["mfu"] / base["mfu"] <= MFU_SPREAD:
        flag("MFU", f"{row['mfu']:.3g} against the baseline's {base['mfu']:.3g}",
             "one run got a far smaller share of the same hardware (a shared node, a slow rank)")
    fwd, base_fwd = ((r.get("phase_seconds") or {}).get("forward") for r in (row, base))
    if fwd and base_fwd and not 1 / FORWARD_SPREAD <= fwd / base_fwd <= FORWARD_SPREAD:
        flag("forward time", f"{fwd:.3g} s per step against the baseline's {base_fwd:.3g} s, though the forward pass "
                             "is the same work in both",
             "the machine ran at another speed for one of the runs (another job, a straggler, another node)")
    return flags


def project(row: dict, p: Projection) -> dict:
    """GPU-hours for a data set of p.samples on p.nodes x p.gpus_per_node GPUs of type p.gpu (a projection)."""
    gpus = p.nodes * p.gpus_per_node
    if not row["samples"] or not row["step_seconds"] or not row["steps"]:
        return {"run": row["name"], "basis": "not enough measurements (the run has no steady-state steps)"}
    if row["hardware"] and p.gpu in row["hardware"]:
        per_gpu = row["samples"] / row["steps"] / row["step_seconds"] / row["ranks"]  # samples/s/GPU, measured
        gpu_hours = p.samples / per_gpu / 3600
        basis = f"measured throughput on {row['hardware']} ({per_gpu:.2f} samples/s/GPU)"
    else:
        flops_per_sample = row["model_tflops_per_step"] * 1e12 * row["steps"] / row["samples"]
        peak = PEAK_TFLOPS[p.gpu] * 1e12
        gpu_hours = p.samples * flops_per_sample / (peak * p.assumed_mfu) / 3600
        basis = (f"FLOPs per sample from the FLOP model ({flops_per_sample / 1e12:.4f} TFLOP) at an assumed MFU of "
                 f"{p.assumed_mfu:.2f} on {p.gpu} ({PEAK_TFLOPS[p.gpu]:.0f} TFLOP/s); measured only on "
                 f"{row['hardware']}")
    return {"run": row["name"], "samples": p.samples, "gpus": gpus, "gpu": p.gpu, "gpu_hours": gpu_hours,
            "wall_hours": gpu_hours / gpus, "basis": basis}


def build(paths: list[str], baseline: str | None = None, price: float = 2.0,
          projection: Projection | None = None) -> dict:
    """The report's data. Unusable directories are listed with the reason instead of failing the report."""
    rows, problems = [], []
    for path in paths:
        try:
            rows.append(load_run(path))
        except ReportError as e:
            problems.append(str(e))
    if not rows:
        raise ReportError("no usable run directory:\n  " + "\n  ".join(problems))
    base = None
    if baseline is not None:
        base = load_run(baseline)
        if all(r["path"] != base["path"] for r in rows):
            rows.insert(0, base)
    else:
        base = next((r for r in rows if r["region"] == "full"), None)
    notes = [] if base else ["no full-tuning baseline among the runs (region 'full'); pass --baseline DIR"]
    comparisons = [compare(r, base, price) for r in rows if base is not None and r is not base]
    projections = [project(r, projection) for r in rows] if projection else []
    return {"runs": rows, "baseline": base["name"] if base else None, "comparisons": comparisons,
            "projection": projections, "problems": problems, "notes": notes}


def category_accuracy(evaluation: dict) -> dict:
    """{category: accuracy} of an evaluation's ``by_category`` (empty when it has none)."""
    return {k: v["accuracy"] for k, v in evaluation.get("by_category", {}).items()}


def region_label(run: dict) -> str | None:
    """A run's region as the report names it: its spec, and a moving region's schedule after a ~
    (``full~random:2/10``, as launch/compare.py's --regions writes it)."""
    cfg = run.get("config", {})
    spec = run.get("region", {}).get("spec", cfg.get("region"))
    return f"{spec}~{cfg['region_schedule']}" if cfg.get("region_schedule") else spec


def by_region(rows: list[dict], baseline: str = "full") -> list[dict]:
    """One row per region over its runs (seeds, in the order the regions first appear): trainable parameters,
    held-out accuracy (mean, sample standard deviation, min, max), accuracy relative to the ``baseline`` region's
    mean, per-category accuracy and text retention, held-out loss, steady-state step time and GPU-hours (means)
    and GPU-hours relative to the baseline."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["region"], []).append(r)

    def mean(rs, key):
        vals = [r[key] for r in rs if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    out = []
    for region, rs in groups.items():
        acc = [r["accuracy"] for r in rs if r["accuracy"] is not None]
        m = mean(rs, "accuracy")
        std = (sum((a - m) ** 2 for a in acc) / (len(acc) - 1)) ** 0.5 if len(acc) > 1 else (0.0 if acc else None)
        out.append({"region": region, "runs": [r["name"] for r in rs], "seeds": [r["seed"] for r in rs],
                    "trainable_params": rs[0]["trainable_params"], "accuracy": m, "accuracy_std": std,
                    "accuracy_min": min(acc) if acc else None, "accuracy_max": max(acc) if acc else None,
                    "eval_loss": mean(rs, "eval_loss"), "step_seconds": mean(rs, "step_seconds"),
                    "gpu_hours": mean(rs, "gpu_hours"), "text_retention": mean(rs, "text_retention"),
                    "accuracy_by_category": {c: sum(r["accuracy_by_category"][c] for r in rs) / len(rs)
                                             for c in rs[0]["accuracy_by_category"]
                                             if all(c in r["accuracy_by_category"] for r in rs)}})
    base = next((g for g in out if g["region"] == baseline), None)
    for g in out:
        g["accuracy_vs_full"] = _ratio(g["accuracy"], base["accuracy"]) if base else None
        g["gpu_hours_vs_full"] = _ratio(g["gpu_hours"], base["gpu_hours"]) if base else None
        g["step_time_vs_full"] = _ratio(g["step_seconds"], base["step_seconds"]) if base else None
    return out


REGION_COLUMNS = ["region", "seeds", "trainable_params", "accuracy", "accuracy_std", "accuracy_vs_full",
                  "by_category", "text_retention", "eval_loss", "step_seconds", "step_time_vs_full", "gpu_hours",
                  "gpu_hours_vs_full"]


COLUMNS = ["name", "status", "region", "tuner", "trainable_params", "hardware", "ranks", "steps", "tokens",
           "wall_hours", "gpu_hours", "tokens_per_s_per_gpu", "mfu", "final_loss", "accuracy"]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def _region_cell(row: dict, column: str) -> str:
    if column == "by_category":
        return ", ".join(f"{k} {v:.3f}" for k, v in row["accuracy_by_category"].items()) or "n/a"
    return _fmt(row[column])


def _plots(report: dict) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = {}
    runs = report["runs"]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in runs:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), label=f"{r['name']} ({r['region']})")
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.legend(fontsize=8), ax.set_title("Loss curves")
    out["loss_curves.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["name"] for r in runs]
    bottom = [0.0] * len(runs)
    for phase in ("data", "forward", "backward", "optimizer"):
        vals = [(r["phase_seconds"] or {}).get(phase, 0.0) for r in runs]
        ax.bar(names, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per step (steady state)"), ax.legend(fontsize=8), ax.set_title("Step time breakdown")
    out["step_time.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [r["gpu_hours"] or 0.0 for r in runs])
    ax.set_ylabel("GPU-hours (wall x ranks)"), ax.set_title("GPU-hours per run")
    out["gpu_hours.png"] = _png(fig)

    shown = [g for g in report.get("regions", []) if g["accuracy"] is not None and g["gpu_hours"] is not None]
    if shown:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for g in shown:
            ax.errorbar(g["gpu_hours"], g["accuracy"], yerr=g["accuracy_std"] or 0.0, fmt="o", capsize=3)
            ax.annotate(g["region"], (g["gpu_hours"], g["accuracy"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel("GPU-hours per run (mean over seeds)"), ax.set_ylabel("held-out answer accuracy")
        ax.set_title("Accuracy against GPU-hours per region")
        out["accuracy_vs_gpu_hours.png"] = _png(fig)
    plt.close("all")
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _markdown(report: dict, images: list[str]) -> str:
    lines = ["# Cost report", "", "Measured from the run directories below; the projection section is a projection."]
    if report.get("regions"):
        lines += ["", "## Regions (mean over seeds; relative to region full)", "",
                  "| " + " | ".join(REGION_COLUMNS) + " |", "|" + "---|" * len(REGION_COLUMNS)]
        lines += ["| " + " | ".join(_region_cell(g, c) for c in REGION_COLUMNS) + " |" for g in report["regions"]]
        s1 = report.get("stage1")
        if s1:
            lines += ["", f"Before stage 2 (`{s1['model']}`, where the arms start, evaluated the same way): accuracy "
                          f"{s1['accuracy']:.3f} ({_region_cell(s1, 'by_category')}), text retention "
                          f"{s1['text_retention']:.3f}. A region's text retention below this is what its stage 2 "
                          "forgot."]
    lines += ["", "## Runs", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report["runs"]:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |")
    if report["comparisons"]:
        lines += ["", f"## Against the full-tuning baseline ({report['baseline']})", "",
                  "| run | GPU-hours | baseline GPU-hours | saved | saved % | cost saved | step-time ratio "
                  "(measured) | ratio (FLOP model) | peak memory saved GB | accuracy change |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in report["comparisons"]:
            lines.append(f"| {c['run']} | {_fmt(c['gpu_hours'])} | {_fmt(c['baseline_gpu_hours'])} | "
                         f"{_fmt(c['gpu_hours_saved'])}{' (flagged)' if c['flags'] else ''} | "
                         f"{_fmt(c['gpu_hours_saved_pct'])} | "
                         f"{_fmt(c['cost_saved'])} at {c['price_per_gpu_hour']}/GPU-h | {_fmt(c['step_time_ratio'])} | "
                         f"{_fmt(c['ideal_ratio'])} | {_fmt(c['peak_memory_saved_gb'])} | "
                         f"{_fmt(c['accuracy_delta'])} |")
            lines += [f"- {c['run']}: {n}" for n in c["notes"]]
            lines += [f"- **{c['run']}: not to be trusted ({f['check']})**: {f['detail']}. Likely cause: {f['cause']}. "
                      f"Remedy: {f['remedy']}." for f in c["flags"]]
    in_run = [r for r in report["runs"] if r.get("compare_full")]
    if in_run:
        lines += ["", "## Full-tuning arm timed in the same allocation (--compare-full)", ""]
        for r in in_run:
            c = r["compare_full"]
            if "error" in c:
                lines.append(f"- {r['name']}: {c['error']}")
                continue
            lines.append(f"- {r['name']}: step {c['step_seconds']['selective']:.4g} s vs full "
                         f"{c['step_seconds']['full']:.4g} s: ratio {c['step_time_ratio']:.3f} (FLOP model "
                         f"{c['ideal_ratio']:.3f}); one epoch ({c['steps_per_epoch']} steps) projected at "
                         f"{c['epoch_gpu_hours']['selective']:.4g} vs {c['epoch_gpu_hours']['full']:.4g} GPU-hours; "
                         f"full arm: {c['source']}")
    if report["projection"]:
        lines += ["", "## Projection (not a measurement)", ""]
        for p in report["projection"]:
            if "gpu_hours" in p:
                lines.append(f"- {p['run']}: {p['samples']:,} samples on {p['gpus']} x {p['gpu']}: "
                             f"{p['gpu_hours']:.1f} GPU-hours, {p['wall_hours']:.2f} h wall; from {p['basis']}")
            else:
                lines.append(f"- {p['run']}: {p['basis']}")
    for title, items in (("Notes", report["notes"]), ("Run directories left out", report["problems"])):
        if items:
            lines += ["", f"## {title}", ""] + [f"- {x}" for x in items]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: str) -> list[str]:
    """report.json, report.csv, report.md (+ PNGs) and a self-contained report.html in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows([[r[c] for c in COLUMNS] for r in report["runs"]])
    plots = _plots(report)
    for name, data in plots.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    md = _markdown(report, list(plots))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    body = html.escape(md.split("## Plots")[0])
    imgs = "".join(f'<p><img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}"></p>'
                   for n, d in plots.items())
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>Cost report</title></head>"
                f"<body><pre>{body}</pre><h2>Plots</h2>{imgs}</body></html>\n")
    return ["report.json", "report.csv", "report.md", "report.html", *plots]
