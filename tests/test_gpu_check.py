"""bench/gpu_check.py, the check prepared for a lent GPU: its --smoke run on CPU goes through every code path of the
GPU run (real DeepSpeed ZeRO-2 engines of full, uniform25 and LoRA with and without checkpointing, the planner's
memory, packed against padded, fp16 with loss scaling and bf16), so the script cannot rot before a GPU comes."""
import json
import sys

from conftest import run


def test_the_gpu_check_runs_at_toy_size_on_cpu(tmp_path):
    res = run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "gpu_check.json").read_text())
    assert got["mode"] == "smoke" and got["device"] == "cpu"
    arms = {(a["region"], a["tuner"], a["grad_ckpt"]): a for a in got["arms"]}
    assert sorted(arms) == sorted((r, t, c) for r, t in (("full", "full"), ("uniform25", "full"),
                                                         ("uniform25", "lora")) for c in (False, True))
    for a in arms.values():
        assert a["finite"] and a["step_s"] > 0 and 0 < a["mfu"] <= a["hfu"]
        assert a["planned"]["total"] == a["planned"]["model_states"] + a["planned"]["activations"] + a["planned"][
            "recompute"] > 0
        assert (a["planned"]["recompute"] > 0) == a["grad_ckpt"]
        assert (a["hardware_flops"] > a["model_flops"]) == a["grad_ckpt"]
    # the FLOP model's ratios beside the measured ones, to full tuning at the same checkpointing
    ratios = {r["arm"]: r for r in got["ratios"]}
    assert set(ratios) == {"uniform25 full", "uniform25 full ckpt", "uniform25 lora", "uniform25 lora ckpt"}
    full, uni = arms[("full", "full", False)], arms[("uniform25", "full", False)]
    assert ratios["uniform25 full"]["model"] == uni["model_flops"] / full["model_flops"] < 1
    # packed and padded: the same samples, the same loss (bf16 noise), no padding in the packed row
    p = got["packing"]
    assert p["relative_loss_difference"] < 2e-2 and p["packed"]["row_tokens"] == sum(p["lengths"])
    assert p["padded"]["row_tokens"] == len(p["lengths"]) * max(p["lengths"])
    steps = {s["precision"]: s for s in got["precision_steps"]}
    assert steps["fp16"]["finite"] and steps["fp16"]["loss_scale"] > 1  # DeepSpeed's dynamic loss scaler
    assert all(s["finite"] for s in steps.values()) and len(steps) == 2
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| uniform25 | lora | yes | sdpa |" in md and "fp16 step:" in md
