"""launch/evaluate.py on a model trained here: the standalone evaluation equals the end-of-run evaluation on the
same model and data, on one process and on 2 ranks under ZeRO-3; its report says what was evaluated."""
import json
import sys

import pytest

from conftest import deepspeed_cmd, run
from lvlm_region.data.demo import COLORS, POSITIONS, SHAPES

EVAL = "data/demo/sft_eval.json"
N = 6  # held-out samples (as conftest's sft_uniform25 ran): even, so 2 ranks need no shard padding


@pytest.fixture(scope="module")
def trained(sft_uniform25):
    run_json = json.loads((sft_uniform25 / "run.json").read_text())
    return sft_uniform25, run_json["eval"], run_json["text_eval"]


def same_evaluation(got: dict, want: dict) -> None:
    assert (got["samples"], got["correct"], got["accuracy"]) == (want["samples"], want["correct"], want["accuracy"])
    assert got["samples"] == N
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["by_category"] == want["by_category"]
    for key in ("right", "wrong"):
        assert [(r["id"], r["output"], r["right"]) for r in got[key]] == \
               [(r["id"], r["output"], r["right"]) for r in want[key]]


def test_end_of_run_evaluation_has_categories_and_text_retention(trained):
    _, at_end, text = trained
    # The demo's held-out questions cycle color, shape, position; the text-retention set asks the same ones.
    assert {k: v["samples"] for k, v in at_end["by_category"].items()} == {"color": 2, "position": 2, "shape": 2}
    for ev in (at_end, text):
        assert sum(v["correct"] for v in ev["by_category"].values()) == ev["correct"]
        assert all(v["accuracy"] == v["correct"] / v["samples"] for v in ev["by_category"].values())
    assert text["samples"] == N and all("<image>" not in r["question"] for r in text["right"] + text["wrong"])
    words = {*COLORS, *SHAPES, *POSITIONS}
    assert all(r["reference"] in words for r in text["right"] + text["wrong"])


def test_one_process_equals_the_end_of_run_evaluation(trained):
    model, at_end, text = trained
    res = run([sys.executable, "launch/evaluate.py", "--model", str(model), "--data", EVAL, "--eval-max-samples",
               str(N), "--num-workers", "0", "--text-eval-data", "data/demo/text_eval.json"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    e = json.loads((model / "eval" / "eval.json").read_text())  # default output: MODEL/eval
    same_evaluation(e, at_end)
    same_evaluation(e["text_eval"], text)
    assert (e["world_size"], e["zero_stage"]) == (1, 2)
    assert e["template"] == "auto" and e["image_aspect_ratio"] == "pad" and e["max_length"] == 2048  # its run.json
    assert e["trained"]["stage"] == "sft" and e["trained"]["region"]["spec"] == "uniform25"
    assert e["trained"]["eval_at_end"] == at_end["accuracy"]
    assert (len(e["right"]), len(e["wrong"])) == (min(e["correct"], 5), min(N - e["correct"], 5))  # up to 5 of each
    assert all(r["reference"] for r in e["right"] + e["wrong"])
    md = (model / "eval" / "eval.md").read_text()
    assert f"**Answer accuracy {e['accuracy']:.3f}** ({e['correct']}/{N}," in md
    assert "Trained here: stage sft, region `uniform25`" in md and "## Wrong answers" in md
    assert f"Text retention (`{e['text_data']}`, text-only questions): accuracy {text['accuracy']:.3f}" in md
    assert f"| color | {at_end['by_category']['color']['accuracy']:.3f} |" in md
    assert f"held-out answer accuracy {e['accuracy']:.3f} ({e['correct']}/{N})" in res.stdout


def test_two_ranks_zero3_equal_the_end_of_run_evaluation(trained, tmp_path):
    model, at_end, _ = trained
    out = tmp_path / "e3"
    res = run(deepspeed_cmd(2, "launch/evaluate.py", "--model", str(model), "--data", EVAL, "--eval-max-samples",
                            str(N), "--num-workers", "0", "--zero", "3", "--output-dir", str(out)), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    e = json.loads((out / "eval.json").read_text())
    same_evaluation(e, at_end)
    assert (e["world_size"], e["zero_stage"]) == (2, 3)


@pytest.mark.parametrize("args,message", [
    (["--model", "runs/none"], "--model and --data are required"),
    (["--model", "no/such/model", "--data", EVAL], "--model no/such/model: no config.json"),
    (["--model", "data/demo/base_model", "--data", EVAL, "--eval-max-samples", "-1"],
     "--eval-max-samples must be a whole number >= 0, got -1"),
])
def test_bad_input_is_refused_before_loading(demo_dir, args, message):
    res = run([sys.executable, "launch/evaluate.py", *args], timeout=300)
    assert res.returncode == 2 and message in res.stderr
    assert "Loading weights" not in res.stdout + res.stderr
