"""The README demo, as written: stage 1 then `deepspeed launch/sft.py --region uniform25 --init ...`.

The held-out answer accuracy must be well above chance (0.222) after the default budget, and the LLM must keep
most of what it answered from text before stage 2.
"""
import json

from conftest import deepspeed_cmd, run

from lvlm_region.demo import chance_accuracy

MIN_ACCURACY = 0.90  # measured 0.967 on this CPU machine, seed 0; 0.967-0.971 over seeds 0-2 (README, 2026-12-04)
MIN_TEXT_RETENTION = 0.80  # measured 0.854, seed 0; 0.854-0.892 over seeds 0-2 (1.000 before stage 2). Was 0.85
# until the demo's stage 1 took LLaVA's plain tokenization (2026-12-04), which left seed 0 one question above it.


def test_demo_learns(demo_dir, tmp_path):
    pre, sft = tmp_path / "pretrain", tmp_path / "sft-u25"
    res = run(deepspeed_cmd(1, "launch/pretrain.py", "--output-dir", str(pre), runner=True), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    res = run(deepspeed_cmd(1, "launch/sft.py", "--region", "uniform25", "--init", str(pre), "--output-dir",
                            str(sft), runner=True), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    ev = json.loads((sft / "run.json").read_text())["eval"]
    assert ev["samples"] == 240
    assert round(chance_accuracy(), 3) == 0.222
    assert ev["accuracy"] >= MIN_ACCURACY, ev
    assert sorted(ev["by_category"]) == ["color", "position", "shape"]
    assert {v["samples"] for v in ev["by_category"].values()} == {80}
    text = json.loads((sft / "run.json").read_text())["text_eval"]
    assert text["samples"] == 240 and text["accuracy"] >= MIN_TEXT_RETENTION, text
