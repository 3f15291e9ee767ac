"""Region spec resolution: presets, counts, explicit lists, parts, and every invalid form's error."""
import json

import pytest

from lvlm_region.model.regions import VALID_FORMS, PAPER32, RegionError, resolve, uniform_indices

DEPTHS = (8, 16, 24, 26, 32, 40, 80)


def gaps(idx):
    return [b - a for a, b in zip(idx, idx[1:])]


# Expected values written by hand from the documented formulas.
@pytest.mark.parametrize("depth,expected", [
    (8, [0, 7]),
    (16, [0, 5, 10, 15]),
    (24, [0, 5, 9, 14, 18, 23]),
    (26, [0, 4, 8, 13, 17, 21, 25]),  # k = round(6.5) = 7 (half up)
    (32, [0, 4, 9, 13, 18, 22, 27, 31]),
    (40, [0, 4, 9, 13, 17, 22, 26, 30, 35, 39]),
    (80, [0, 4, 8, 12, 17, 21, 25, 29, 33, 37, 42, 46, 50, 54, 58, 62, 67, 71, 75, 79]),
])
def test_uniform25_by_hand(depth, expected):
    assert list(resolve("uniform25", depth).layers) == expected


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("pct", [1, 10, 12.5, 25, 33, 50, 75, 100])
def test_uniform_properties(depth, pct):
    idx = list(resolve(f"uniform{pct}", depth).layers)
    k = max(1, int(pct * depth / 100 + 0.5))
    assert len(idx) == k == len(set(idx))
    assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < depth
    if k >= 2:
        assert idx[0] == 0 and idx[-1] == depth - 1  # both ends of the stack
        assert max(gaps(idx)) - min(gaps(idx)) <= 1  # evenly spread


@pytest.mark.parametrize("depth", DEPTHS)
def test_contiguous_presets(depth):
    k = int(25 * depth / 100 + 0.5)
    assert list(resolve("first25", depth).layers) == list(range(k))
    assert list(resolve("last25", depth).layers) == list(range(depth - k, depth))
    mid = list(resolve("middle25", depth).layers)
    assert len(mid) == k and gaps(mid) == [1] * (k - 1)
    assert abs(mid[0] - (depth - 1 - mid[-1])) <= 1  # centred
    assert list(resolve("full", depth).layers) == list(range(depth))
    assert resolve("none", depth).layers == ()


def test_count_forms_and_rounding():
    assert list(resolve("uniform:8", 32).layers) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert list(resolve("first:3", 32).layers) == [0, 1, 2]
    assert list(resolve("last:2", 10).layers) == [8, 9]
    assert list(resolve("middle:2", 10).layers) == [4, 5]
    assert list(resolve("uniform:1", 9).layers) == [4]
    assert len(resolve("uniform1", 8).layers) == 1  # 0.08 layers rounds to 0, at least 1
    assert len(resolve("uniform12.5", 4).layers) == 1  # 0.5 rounds half up to 1
    assert len(resolve("uniform37.5", 4).layers) == 2  # 1.5 -> 2
    assert len(resolve("uniform62.5", 4).layers) == 3  # 2.5 -> 3 (not banker's 2)


def test_explicit_and_paper_lists():
    assert list(resolve("layers:13,1,5,9", 32).layers) == [1, 5, 9, 13]
    assert list(resolve("layers:1, 5", 32).layers) == [1, 5]  # spaces do not drop indices
    assert resolve("paper32", 32).layers == PAPER32 == (1, 5, 9, 13, 19, 23, 27, 31)
    assert uniform_indices(2, 2) == [0, 1]


def test_parts_default_and_switches():
    r = resolve("uniform25", 8)
    assert r.parts == {"projector": True, "vision": False, "embed": False, "norm": False, "lm_head": False}
    r = resolve("uniform25+lm_head+norm-projector", 8)
    assert r.parts == {"projector": False, "vision": False, "embed": False, "norm": True, "lm_head": True}
    r = resolve("none-projector+vision", 8)
    assert r.layers == () and r.parts["vision"] and not r.parts["projector"]
    assert resolve(" Uniform25 ", 8).layers == (0, 7)


@pytest.mark.parametrize("spec,depth,problem", [
    ("uniform", 32, "uniform needs a percentage or :count"),
    ("uniform0", 32, "percentage 0 is outside (0, 100]"),
    ("uniform101", 32, "percentage 101 is outside (0, 100]"),
    ("uniform-5", 32, "percentage -5 is outside (0, 100]"),
    ("uniformx", 32, "percentage 'x' is not a number"),
    ("uniform:0", 32, "layer count 0 is outside 1..32"),
    ("first:33", 32, "layer count 33 is outside 1..32"),
    ("layers:1,32", 32, "layer index 32 is out of range 0..31"),
    ("layers:1,5,1", 32, "layer index 1 is listed more than once"),
    ("layers:1,,5", 32, "layers: takes comma-separated 0-based whole numbers"),
    ("layers:", 32, "layers: takes comma-separated 0-based whole numbers"),
    ("layers:-1", 32, "layers: takes comma-separated 0-based whole numbers"),
    ("paper32", 40, "paper32 is defined for 32-layer LLMs only, this one has 40"),
    ("sparse25", 32, "unknown layer selection 'sparse25'"),
    ("", 32, "the spec is empty"),
    ("uniform25+head", 32, "unknown part 'head'"),
    ("none-projector", 32, "it selects nothing to train"),
    ("uniform25.ffn", 32, "unknown sub-layer 'ffn' (valid: attn, mlp)"),
    ("uniform25.mlp.attn", 32, "one sub-layer at most (attn, mlp), not mlp.attn"),
    ("none.mlp", 32, ".mlp needs decoder layers to take it from, and 'none' selects none"),
])
def test_invalid_specs_fail_with_valid_forms(spec, depth, problem):
    with pytest.raises(RegionError) as e:
        resolve(spec, depth)
    msg = str(e.value)
    assert problem in msg
    assert "valid region specs: full | none | paper32" in msg and "layers:<i>,<j>" in msg


def test_layers_by_importance_scores(tmp_path):
    d = tmp_path / "Run-A+b"  # the path keeps its case and its own + and - characters
    d.mkdir()
    f = d / "scores.json"
    f.write_text(json.dumps({"method": "bi", "scores": [0.1, 0.5, 0.5, 0.05, 0.3, 0.2, 0.5, 0.9]}))
    assert resolve(f"top25@{f}", 8).layers == (1, 7)  # 0.9 then the first of three tied 0.5s
    assert resolve(f"top:4@{f}", 8).layers == (1, 2, 6, 7)
    assert resolve(f"bottom:2@{f}", 8).layers == (0, 3)
    assert resolve(f"bottom50@{f}", 8).layers == (0, 3, 4, 5)
    r = resolve(f"top:1@{f} + lm_head - projector", 8)
    assert (r.layers, r.parts["lm_head"], r.parts["projector"]) == ((7,), True, False)
    assert r.spec == f"top:1@{f} + lm_head - projector"


@pytest.mark.parametrize("spec,depth,problem", [
    ("top25@{f}", 9, "scores file {f} scores 8 layers but this LLM has 9"),
    ("top25@{f}.missing", 8, "scores file {f}.missing does not exist (write one with launch/importance.py)"),
    ("top25@{bad}", 8, "scores file {bad} has no list of finite per-layer 'scores'"),
    ("top25", 8, "'top25' needs the scores file: top25@FILE"),
    ("uniform25@{f}", 8, "@FILE follows top<P> / top:<K> / bottom<P> / bottom:<K> only, not 'uniform25'"),
    ("top:9@{f}", 8, "layer count 9 is outside 1..8"),
    ("top25@", 8, "@ is followed by no scores file"),
])
def test_bad_score_specs(tmp_path, spec, depth, problem):
    f, bad = tmp_path / "scores.json", tmp_path / "bad.json"
    f.write_text(json.dumps({"scores": [0.1] * 8}))
    bad.write_text(json.dumps({"scores": [0.1, float("nan")]}))
    with pytest.raises(RegionError) as e:
        resolve(spec.format(f=f, bad=bad), depth)
    assert problem.format(f=f, bad=bad) in str(e.value)
    assert "top<P>@FILE" in str(e.value)


def test_sublayer_specs(tmp_path):
    """.attn / .mlp narrow the selected layers to one sub-layer, after any layer form (a percentage's decimal point
    is not one), before +/- parts and before a scores file's @."""
    r = resolve("uniform25.mlp", 32)
    assert (r.layers, r.sublayer) == ((0, 4, 9, 13, 18, 22, 27, 31), "mlp")
    assert r.to_dict()["sublayer"] == "mlp" and resolve("uniform25", 32).sublayer is None
    r = resolve("layers:0, 7.attn + lm_head", 32)
    assert (r.layers, r.sublayer, r.parts["lm_head"], r.parts["projector"]) == ((0, 7), "attn", True, True)
    assert resolve("uniform12.5.mlp", 32).layers == resolve("uniform12.5", 32).layers == (0, 10, 21, 31)
    assert resolve("first:2.attn-projector", 32).parts["projector"] is False
    (tmp_path / "s.json").write_text(json.dumps({"scores": list(range(8))}))
    r = resolve(f"top25.mlp@{tmp_path}/s.json", 8)
    assert (r.layers, r.sublayer) == ((6, 7), "mlp")
    assert "uniform25.mlp" in VALID_FORMS
