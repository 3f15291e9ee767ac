"""--lr-groups: one optimizer group per named part at its own peak LR (warm-up and decay shared), recorded in run.json,
the metrics and the resume identity; refused when malformed or when the region trains nothing of a named part."""
import json
import re
import sys

import pytest
from transformers import LlavaForConditionalGeneration

from conftest import run
from lvlm_region.config import RunConfig


@pytest.mark.parametrize("groups,extra,message", [
    ("foo=1e-3", {}, "--lr-groups: unknown part 'foo' (valid: region, projector, vision, embed, norm, lm_head)"),
    ("region", {}, "--lr-groups 'region': 'region' is not PART=LR"),
    ("region=1e-3,region=1e-4", {}, "--lr-groups names region twice"),
    ("region=-1", {}, "--lr-groups region=-1: the LR must be a finite number > 0"),
    ("region=nan", {}, "--lr-groups region=nan: the LR must be a finite number > 0"),
    ("projector=1e-3", {"projector_lr": 1e-4}, "--lr-groups names projector=0.001 and --projector-lr 0.0001 is given"),
])
def test_a_malformed_lr_groups_is_refused(groups, extra, message):
    with pytest.raises(ValueError) as e:
        RunConfig(stage="sft", output_dir="o", lr_groups=groups, **extra).resolve()
    assert message in str(e.value)


def test_a_part_the_region_does_not_train_is_refused_before_loading(tmp_path):
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(tmp_path / "o"), "--lr-groups",
               "vision=1e-5,region=1e-4"], timeout=300)
    assert res.returncode == 2
    assert ("--lr-groups vision=1e-05: region 'uniform25' trains no vision parameter, so the group would be empty; "
            "give +vision in the region, or drop vision from --lr-groups") in res.stderr
    assert not (tmp_path / "o").exists()


def test_each_part_steps_at_its_own_rate(demo_dir, demo_sft_data, tmp_path):
    """One step of Adam, no warm-up, no weight decay: each trained element moves by its group's LR (Adam's first
    step is lr x g / |g|), so the largest change of each part is its rate: region (the MLPs of layers 0 and 7)
    1e-3, LM head 1e-4, projector 1e-2; the layers' attention and everything else stay bit-identical."""
    out = tmp_path / "o"
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(out), *demo_sft_data, "--region",
               "uniform25.mlp+lm_head", "--lr-groups", "region=1e-3, lm_head=1e-4, projector=1e-2", "--lr", "1e-5",
               "--max-steps", "1", "--warmup-ratio", "0", "--weight-decay", "0", "--micro-batch", "4",
               "--num-workers", "0", "--log-every", "1", "--eval-max-samples", "2", "--save-every", "1"],
              timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    base = LlavaForConditionalGeneration.from_pretrained(demo_dir / "base_model").state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    assert base.keys() == after.keys()
    moved = {k: float((after[k] - base[k]).abs().max()) for k in base}
    by_part = {"region": r"model.language_model.layers.(0|7).mlp.", "lm_head": "lm_head.",
               "projector": "model.multi_modal_projector."}
    for part, lr in (("region", 1e-3), ("lm_head", 1e-4), ("projector", 1e-2)):
        got = [v for k, v in moved.items() if re.match(by_part[part], k)]
        assert got and max(got) == pytest.approx(lr, rel=1e-3), (part, max(got))
    others = [k for k in moved if not any(re.match(p, k) for p in by_part.values())]
    assert others and all(moved[k] == 0 for k in others)  # the layers' attention and norms, the rest of the model
    summary = json.loads((out / "run.json").read_text())
    assert summary["config"]["lr_groups"] == "region=1e-3, lm_head=1e-4, projector=1e-2"
    groups = summary["lr_groups"]
    assert {k: v["lr"] for k, v in groups.items()} == {"region": 1e-3, "lm_head": 1e-4, "projector": 1e-2}
    assert groups["region"]["tensors"] == 2 * 3  # gate, up and down of two layers' MLPs
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])  # logged after the step: decayed to 0
    assert {"region_lr", "lm_head_lr", "projector_lr", "lr"} <= step.keys()
    state = json.loads(next((out / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["identity"]["lr_groups"] == "region=1e-3, lm_head=1e-4, projector=1e-2"
    assert "learning rates per part (--lr-groups; the rest at --lr 1e-05): region 0.001 (6 tensors)" in res.stdout
