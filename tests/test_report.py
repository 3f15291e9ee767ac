"""The cost report from fixture run directories: the numbers in the report are the inputs' (values written here)."""
import base64
import csv
import json
import sys

import pytest

from conftest import run


def fixture_run(root, name, region, gpu_seconds, steps, step_s, tflops, peak_gb, accuracy, status="complete",
                hardware="NVIDIA A100-SXM4-80GB", mfu=0.4, ranks=8, forward_s=None):
    d = root / name
    d.mkdir()
    run_json = {
        "status": status, "config": {"region": region, "micro_batch": 16, "zero": 3, "grad_ckpt": True},
        "region": {"spec": region, "layers": [0, 7]}, "parameters": {"all": {"trainable": 1000, "total": 4000}},
        "device_name": hardware, "world_size": ranks, "steps": steps, "steps_done": steps, "final_loss": 0.5,
        "eval": {"accuracy": accuracy},
        "time": {"elapsed_s": gpu_seconds / 8, "gpu_seconds": gpu_seconds},
        "timing": {"tokens_total": 1e6, "samples_total": 128.0 * steps, "tokens_per_s_per_gpu": 5000.0, "mfu": mfu,
                   "step_seconds": step_s, "model_tflops_per_step": tflops, "hardware_tflops_per_step": tflops,
                   "phase_seconds": {"data": 0.01, "forward": forward_s or step_s / 3, "backward": step_s / 2,
                                     "optimizer": 0.05},
                   "peak_memory_gb_rank0": peak_gb, "memory_estimate_gb": peak_gb - 10},
    }
    if region != "full":
        run_json["compare_full"] = {"source": "measured here", "step_seconds": {"selective": step_s, "full": 4.0},
                                    "step_time_ratio": step_s / 4.0, "ideal_ratio": 0.75, "steps_per_epoch": 1000,
                                    "epoch_gpu_hours": {"selective": step_s * 1000 * 8 / 3600,
                                                        "full": 4.0 * 1000 * 8 / 3600}}
    if status == "running":
        run_json = {"status": "running", "config": run_json["config"], "region": run_json["region"]}
    (d / "run.json").write_text(json.dumps(run_json))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 4)))
    return d


def test_report_numbers_equal_the_inputs(tmp_path):
    full = fixture_run(tmp_path, "full", "full", gpu_seconds=36000.0, steps=100, step_s=4.0, tflops=800.0,
                       peak_gb=70.0, accuracy=0.60)
    u25 = fixture_run(tmp_path, "u25", "uniform25", gpu_seconds=28800.0, steps=100, step_s=3.2, tflops=600.0,
                      peak_gb=40.0, accuracy=0.59)
    live = fixture_run(tmp_path, "live", "uniform25", 0, 3, 1.0, 1.0, 1.0, 0.0, status="running")
    out = tmp_path / "report"
    res = run([sys.executable, "launch/report.py", str(u25), str(full), str(live), str(tmp_path / "nope"),
               "--output", str(out), "--price-per-gpu-hour", "2.5", "--project-samples", "665000",
               "--project-nodes", "4"])
    assert res.returncode == 0, res.stderr
    assert f"left out: {tmp_path / 'nope'}: no such directory" in res.stderr
    rep = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in rep["runs"]}
    assert rows["u25"]["gpu_hours"] == 8.0 and rows["full"]["gpu_hours"] == 10.0 and rows["u25"]["wall_hours"] == 1.0
    assert rows["live"]["status"] == "in progress (partial figures)" and rows["live"]["steps"] == 3
    assert rep["baseline"] == "full"
    c = next(c for c in rep["comparisons"] if c["run"] == "u25")
    assert c["gpu_hours_saved"] == 2.0 and c["gpu_hours_saved_pct"] == 20.0 and c["cost_saved"] == 5.0
    assert c["step_time_ratio"] == 0.8 and c["ideal_ratio"] == 0.75 and c["peak_memory_saved_gb"] == 30.0
    assert abs(c["accuracy_delta"] + 0.01) < 1e-12 and c["notes"] == [] and c["flags"] == []
    # projection on the measured hardware: 128 samples per 3.2 s step on 8 GPUs = 5 samples/s/GPU
    p = next(p for p in rep["projection"] if p["run"] == "u25")
    assert p["gpu_hours"] == 665000 / 5.0 / 3600 and p["gpus"] == 32 and p["wall_hours"] == p["gpu_hours"] / 32
    assert p["basis"].startswith("measured throughput on NVIDIA A100")
    md = (out / "report.md").read_text()
    assert "| u25 | 8 | 10 | 2 | 20 | 5 at 2.5/GPU-h | 0.8 | 0.75 | 30 | -0.01 |" in md
    assert "## Projection (not a measurement)" in md
    assert ("- u25: step 3.2 s vs full 4 s: ratio 0.800 (FLOP model 0.750); one epoch (1000 steps) projected at "
            "7.111 vs 8.889 GPU-hours") in md
    with open(out / "report.csv") as f:
        csv_rows = {r["name"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["full"]["gpu_hours"]) == 10.0
    page = (out / "report.html").read_text()
    pngs = page.count("data:image/png;base64,")
    assert pngs == 3 and base64.b64decode(page.split("base64,")[1].split('"')[0])[:4] == b"\x89PNG"
    assert (out / "loss_curves.png").stat().st_size > 1000


def test_projection_from_flops_when_measured_elsewhere_and_bad_dirs(tmp_path):
    cpu = fixture_run(tmp_path, "cpu", "uniform25", 7200.0, 10, 2.0, 0.5, 1.0, None, hardware="cpu (x86_64)")
    res = run([sys.executable, "launch/report.py", str(cpu), "--output", str(tmp_path / "r"),
               "--project-samples", "1000", "--project-gpu", "H100", "--assumed-mfu", "0.5"])
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    p = rep["projection"][0]
    # 0.5 TFLOP per step / 128 samples per step; 1000 samples at 0.5 x 989 TFLOP/s
    assert abs(p["gpu_hours"] - 1000 * 0.5e12 / 128 / (989e12 * 0.5) / 3600) < 1e-15
    assert "assumed MFU of 0.50 on H100" in p["basis"] and "measured only on cpu" in p["basis"]
    assert rep["notes"] == ["no full-tuning baseline among the runs (region 'full'); pass --baseline DIR"]
    (tmp_path / "empty").mkdir()
    res = run([sys.executable, "launch/report.py", str(tmp_path / "empty"), "--output", str(tmp_path / "r2")])
    assert res.returncode == 2 and "no run.json; not a run directory of lvlm_region" in res.stderr


def test_a_comparison_that_cannot_be_trusted_says_so(tmp_path):
    # A uniform25 run measured while another job shared the node, against a full run measured alone: 3.68x the
    # GPU-hours (-268% "saved"), a step-time ratio of 5.7 beside the FLOP model's 0.81, a fifth of the MFU, and a
    # forward pass (the same work in both) 5.7x slower.
    full = fixture_run(tmp_path, "full", "full", gpu_seconds=36000.0, steps=100, step_s=4.0, tflops=800.0,
                       peak_gb=70.0, accuracy=0.60, forward_s=1.2)
    shared = fixture_run(tmp_path, "shared", "uniform25", gpu_seconds=132480.0, steps=100, step_s=22.8, tflops=648.0,
                         peak_gb=40.0, accuracy=0.59, mfu=0.057, forward_s=6.84)
    elsewhere = fixture_run(tmp_path, "elsewhere", "uniform25", gpu_seconds=14400.0, steps=100, step_s=3.2,
                            tflops=648.0, peak_gb=40.0, accuracy=0.59, hardware="NVIDIA H100 80GB HBM3", ranks=4,
                            forward_s=1.1)
    res = run([sys.executable, "launch/report.py", str(shared), str(elsewhere), str(full), "--output",
               str(tmp_path / "r")])
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    c = {c["run"]: c for c in rep["comparisons"]}
    assert c["shared"]["gpu_hours_saved_pct"] == pytest.approx(-268.0)
    assert [f["check"] for f in c["shared"]["flags"]] == ["step-time ratio", "MFU", "forward time"]
    ratio = c["shared"]["flags"][0]
    assert ratio["detail"] == ("measured 5.7 against the FLOP model's 0.81 (like for like it lies between 0.689 and "
                               "1.15)")
    assert "another job on the node" in ratio["cause"] and "--compare-full" in ratio["remedy"]
    assert [f["check"] for f in c["elsewhere"]["flags"]] == ["hardware", "world size"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| shared | 36.8 | 10 | -26.8 (flagged) |" in md
    assert "- **shared: not to be trusted (MFU)**: 0.057 against the baseline's 0.4." in md
    assert "- **elsewhere: not to be trusted (hardware)**: measured on NVIDIA H100 80GB HBM3" in md
    assert "shared: -26.8 GPU-hours saved (-268.0%)" in res.stdout and "NOT TO BE TRUSTED (step-time ratio, MFU, " \
        "forward time: see report.md; remedy: --compare-full)" in res.stdout
    assert "not to be trusted" in (tmp_path / "r" / "report.html").read_text()
