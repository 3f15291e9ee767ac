"""The README demo, as written: stage 1 then `deepspeed launch/sft.py --region uniform25 --init ...`, and
`lvlm-region demo`, which runs the same two stages (here it finds them complete).

The held-out answer accuracy must be well above chance (0.222) after the default budget, and the LLM must keep
most of what it answered from text before stage 2.
"""
import json
import sys
from pathlib import Path

from conftest import deepspeed_cmd, run

from lvlm_region.data.demo import chance_accuracy

MIN_ACCURACY = 0.90  # measured 0.967 on this CPU machine, seed 0; 0.967-0.971 over seeds 0-2 (README, 2026-12-04)
MIN_TEXT_RETENTION = 0.80  # measured 0.854, seed 0; 0.854-0.892 over seeds 0-2 (1.000 before stage 2). Was 0.85
# until the demo's stage 1 took LLaVA's plain tokenization (2026-12-04), which left seed 0 one question above it.


def test_demo_learns(demo_dir, tmp_path):
    pre, sft = tmp_path / "pretrain", tmp_path / "sft-uniform25"  # where `lvlm-region demo` puts them
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
    # `lvlm-region demo --output-dir DIR` is these two commands (plus --resume auto): both are found complete
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    res = run([str(Path(sys.executable).parent / "lvlm-region"), "demo", "--output-dir", str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert res.stdout.count("already complete, nothing to do") == 2
    assert f"lvlm-region sft --region uniform25 --init {pre} --output-dir {sft} --resume auto" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
