"""Layer pruning (launch/prune.py) on real tiny Llava and Qwen2-VL / Qwen2.5-VL checkpoints: identity layers pruned
leave the logits unchanged, the pruned checkpoint loads with plain from_pretrained, its KV-cache generation equals
generation without the cache, per-layer config lists are cut, kept layers equal the source's, protected layers
stay, bad input is refused before anything is written, and the sweep with evaluation and a healing SFT run end to
end."""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from conftest import run
from helpers import qwen
from lvlm_region.model import families
from lvlm_region.infra import outputs
from lvlm_region.tools import prune
from lvlm_region.model.families import find_parts
from lvlm_region.model.families.llava import image_seq_length
from lvlm_region.tools.importance import BlockInfluence, bi_scores, token_mask


@pytest.fixture(scope="module")
def base(demo_dir):
    return demo_dir / "base_model"


def write_scores(path, scores, model="elsewhere") -> str:
    path.write_text(json.dumps({"method": "bi", "scores": scores, "model": str(model)}))
    return str(path)


def llava_batch(model, rows: int = 2, text: int = 10) -> dict:
    """An image's tokens then random text, with random pixels: the LLM sees image features too."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    n = image_seq_length(cfg)
    ids = torch.cat([torch.full((rows, n), cfg.image_token_id),
                     torch.randint(10, cfg.text_config.vocab_size - 1, (rows, text), generator=g)], dim=1)
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(rows, 3, size, size, generator=g)}


def load(path):
    model, info = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # plain from_pretrained, every tensor
    return model.eval()


def layer_state(layer) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items()}


@torch.no_grad()
def test_identity_layers_score_zero_and_pruning_them_leaves_logits_unchanged(base, tmp_path):
    model = load(base)
    layers = find_parts(model).layers
    for i in (2, 5):  # identity layers: attention output and MLP down projections zeroed
        layers[i].self_attn.o_proj.weight.zero_()
        layers[i].mlp.down_proj.weight.zero_()
    src = tmp_path / "src"
    model.save_pretrained(src)
    prune.copy_processor(str(base), str(src))
    batch = llava_batch(model)
    hooks = BlockInfluence(layers)
    hooks.mask = token_mask(batch, "all", None)
    want = model(**batch).logits
    hooks.close()
    scores = bi_scores(hooks.sums.tolist(), hooks.counts.tolist())
    assert abs(scores[2]) < 1e-12 and abs(scores[5]) < 1e-12 and min(scores[i] for i in (0, 1, 3, 4, 6, 7)) > 1e-4

    out = tmp_path / "pruned"
    result = prune.run(str(src), write_scores(tmp_path / "s.json", scores), [2], "none", str(out))
    rec = json.loads((out / prune.PRUNE_FILE).read_text())
    assert result["models"][0]["dropped"] == rec["dropped"] == [2, 5]
    assert rec["kept"] == [0, 1, 3, 4, 6, 7] and (rec["layers_before"], rec["layers_after"]) == (8, 6)
    pruned = load(out)
    assert pruned.config.text_config.num_hidden_layers == 6
    torch.testing.assert_close(pruned(**batch).logits, want, rtol=0, atol=1e-5)
    # the kept layers are the source's, bit for bit, in order, and renumbered for the KV cache
    for new, old in enumerate(rec["kept"]):
        a, b = layer_state(find_parts(pruned).layers[new]), layer_state(layers[old])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert find_parts(pruned).layers[new].self_attn.layer_idx == new
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert rec["parameters_before"] - rec["parameters"] == 2 * sum(p.numel() for p in layers[0].parameters())
    assert rec["parameters"] == sum(p.numel() for p in pruned.parameters())
    # the source in memory is untouched by the pruned views it was saved through
    assert len(layers) == 8 and [m.self_attn.layer_idx for m in layers] == list(range(8))


@torch.no_grad()
def test_pruned_llava_generates_the_same_with_and_without_the_kv_cache(base, tmp_path):
    scores = [0.0, 0.1, 0.5, 0.2, 0.6, 0.3, 0.7, 0.0]  # layers 0 and 7 score lowest but are protected
    out = tmp_path / "pruned"
    prune.run(str(base), write_scores(tmp_path / "s.json", scores), [3], "layers:0,7", str(out))
    model = load(out)
    assert json.loads((out / prune.PRUNE_FILE).read_text())["kept"] == [0, 2, 4, 6, 7]
    assert [m.self_attn.layer_idx for m in find_parts(model).layers] == list(range(5))
    batch = llava_batch(model, rows=1)
    pad = model.config.text_config.pad_token_id
    a = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=pad)
    b = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=pad,
                       use_cache=False)
    assert a.shape[1] == batch["input_ids"].shape[1] + 12 and torch.equal(a, b)
    # the in-memory view it was saved through is the same model: renumbered, cut config, same tokens and logits
    source = load(base)
    with prune.pruned_view(source, [0, 2, 4, 6, 7]):
        assert [m.self_attn.layer_idx for m in find_parts(source).layers] == list(range(5))
        assert source.config.text_config.num_hidden_layers == 5
        assert torch.equal(source.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                           pad_token_id=pad), a)
        torch.testing.assert_close(source(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert [m.self_attn.layer_idx for m in find_parts(source).layers] == list(range(8))
    assert source.config.text_config.num_hidden_layers == 8


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_qwen_per_layer_config_lists_are_cut_and_the_cache_indexes_right(family, tmp_path):
    src = tmp_path / "src"
    qwen.build(str(src), family)
    config = AutoConfig.from_pretrained(src)  # 4 layers: two full-attention, then two with a 4-token window
    config.text_config.update({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2,
                               "layer_types": ["full_attention", "full_attention", "sliding_attention",
                                               "sliding_attention"]})
    config.save_pretrained(src)
    out = tmp_path / "pruned"
    prune.run(str(src), write_scores(tmp_path / "s.json", [0.9, 0.1, 0.2, 0.8]), [2], "none", str(out))
    rec = json.loads((out / prune.PRUNE_FILE).read_text())
    assert rec["dropped"] == [1, 2] and rec["kept"] == [0, 3]
    assert rec["config_fields_cut"] == ["num_hidden_layers", "layer_types", "max_window_layers"]
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 2 and text["max_window_layers"] == 1
    assert text["layer_types"] == ["full_attention", "sliding_attention"]
    model = load(out)
    attn = [layer.self_attn for layer in find_parts(model).layers]
    assert [(a.layer_idx, a.sliding_window) for a in attn] == [(0, None), (1, 4)]
    source = load(src)
    for new, old in enumerate(rec["kept"]):
        a, b = layer_state(find_parts(model).layers[new]), layer_state(find_parts(source).layers[old])
        assert all(torch.equal(a[k], b[k]) for k in a)
    # generation well past the window: a cache layer of the wrong kind (or index) gives other tokens
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30, (1, 6), generator=g)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False,
              pad_token_id=model.config.text_config.pad_token_id)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw, use_cache=False))
    families.get(family).load_processor(str(out))  # the processor files came along and load as the family's


def test_a_pruned_qwen2_5_vl_evaluates_with_images_of_several_sizes(tmp_path):
    src = qwen.build(str(tmp_path / "src"), "qwen2_5_vl")
    data = qwen.write_data(str(tmp_path / "data"), n=6)
    scores = write_scores(tmp_path / "s.json", [0.4, 0.1, 0.3, 0.2])
    res = run([sys.executable, "launch/prune.py", "--model", src, "--scores", scores, "--drop", "2", "--protect",
               "none", "--output", str(tmp_path / "out"), "--eval-data", data, "--max-new-tokens", "3",
               "--micro-batch", "3", "--speed-tokens", "3", "--speed-repeats", "1"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    rows = [(r["name"], r["dropped"], r["layers"]) for r in report["rows"]]
    assert rows == [("unpruned", [], 4), ("drop2", [1, 3], 2)]
    for r in report["rows"]:
        e = json.loads((Path(r["eval_dir"]) / "eval.json").read_text())
        assert (e["samples"], e["accuracy"]) == (6, r["accuracy"]) and r["tokens_per_s"] > 0
    assert report["speed"]["prompts"] == 3 and report["protected"] == {"spec": "none", "from": "--protect none",
                                                                       "layers": []}


def test_bad_input_is_refused_before_anything_is_written(base, tmp_path):
    scores = write_scores(tmp_path / "s.json", [0.5] * 8)
    out = tmp_path / "out"
    cases = [
        (lambda: prune.run(str(base), scores, [1], None, str(out)),
         "has no run.json (or prune.json) recording the region it was trained with"),
        (lambda: prune.run(str(base), scores, [7], "uniform25", str(out)),
         "--drop 7: the model has 8 decoder layers, 2 of them in the protected region 'uniform25' (--protect), so "
         "at most 6 can be dropped"),
        (lambda: prune.run(str(base), scores, [8], "none", str(out)), "so at most 7 can be dropped"),
        (lambda: prune.run(str(base), write_scores(tmp_path / "s4.json", [0.5] * 4), [1], "none", str(out)),
         "scores 4 layers but this LLM has 8"),
        (lambda: prune.run(str(base), str(tmp_path / "nope.json"), [1], "none", str(out)), "does not exist"),
        (lambda: prune.run(str(base), scores, [1], "uniform200", str(out)), "--protect: invalid region spec"),
        (lambda: prune.run(str(base), scores, [1], "none", str(base)), "contains --model"),
        (lambda: prune.run(str(base), scores, [1], "none", str(tmp_path)), "contains --scores"),
        (lambda: prune.parse_drops("0"), "positive whole numbers"),
        (lambda: prune.parse_drops("1,x"), "positive whole numbers"),
        (lambda: prune.parse_drops("2,2"), "names a count twice"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert message in str(e.value)
    assert not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(outputs.OutputError, match="already holds files this program did not write"):
        prune.run(str(base), scores, [1], "none", str(mine))
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # the launcher: exit status 2 and the message, nothing loaded
    res = run([sys.executable, "launch/prune.py", "--model", str(base), "--scores", scores, "--drop", "1",
               "--output", str(out)], timeout=120)
    assert res.returncode == 2 and "give --protect SPEC" in res.stderr, res.stderr[-2000:]
    assert not out.exists()
    # OUTPUT.partial, the staging directory removed before the work, under the same rules as OUTPUT: it was deleted
    # with rmtree whatever it was, the source model included.
    import shutil
    source = tmp_path / "m.partial"
    shutil.copytree(base, source)
    before = sorted(p.name for p in source.iterdir())
    with pytest.raises(ValueError, match=f"staging directory {source}: {source} contains --model"):
        prune.run(str(source), scores, [1], "none", str(tmp_path / "m"))
    (tmp_path / "s.partial").mkdir()
    shutil.copy(scores, tmp_path / "s.partial" / "s.json")
    with pytest.raises(ValueError, match="contains --scores"):
        prune.run(str(base), str(tmp_path / "s.partial" / "s.json"), [1], "none", str(tmp_path / "s"))
    (tmp_path / "mine.partial").mkdir()
    (tmp_path / "mine.partial" / "notes.txt").write_text("keep me")
    (mine / "notes.txt").unlink()
    with pytest.raises(outputs.OutputError, match="its staging directory .*already holds files this program did not"):
        prune.run(str(base), scores, [1], "none", str(mine))
    assert sorted(p.name for p in source.iterdir()) == before and (tmp_path / "s.partial" / "s.json").is_file()
    assert (tmp_path / "mine.partial" / "notes.txt").read_text() == "keep me"
    # a leftover of an attempt that died (its marker inside) is this program's own: replaced
    (tmp_path / "mine.partial" / "notes.txt").unlink()
    (tmp_path / "mine.partial" / prune.STAGING).touch()
    (tmp_path / "mine.partial" / "model.safetensors").write_bytes(b"half")
    prune.run(str(base), scores, [1], "none", str(mine))
    assert (mine / prune.PRUNE_FILE).is_file() and not (tmp_path / "mine.partial").exists()
    assert not (mine / prune.STAGING).exists()


def test_sweep_evaluates_and_times_every_model_and_a_pruned_model_heals(demo_dir, sft_uniform25, tmp_path):
    trained = sft_uniform25  # a real uniform25 run: its run.json records the region pruning protects
    run_json = json.loads((trained / "run.json").read_text())
    region = run_json["region"]["layers"]
    assert region == [0, 7]
    # scores as launch/importance.py writes them (tests/test_importance.py checks its numbers): 2 and 6 lowest
    scores = [0.9, 0.3, 0.05, 0.2, 0.1, 0.4, 0.05, 0.02]
    scores_file = tmp_path / "scores.json"
    write_scores(scores_file, scores, trained)
    out = tmp_path / "sweep"
    res = run([sys.executable, "launch/prune.py", "--model", str(trained), "--scores", str(scores_file), "--drop",
               "1,3", "--output", str(out),
               "--eval-data", str(demo_dir / "sft_eval.json"), "--text-eval-data", str(demo_dir / "text_eval.json"),
               "--eval-max-samples", "8", "--micro-batch", "4", "--speed-tokens", "4", "--speed-repeats", "2"],
              timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    report = json.loads((out / "prune_report.json").read_text())
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["unpruned", "drop1", "drop3"]
    # the lowest-scoring layers outside the protected region, nested as K grows
    free = sorted((i for i in range(8) if i not in region), key=lambda i: (scores[i], i))
    assert rows[1]["dropped"] == sorted(free[:1]) and rows[2]["dropped"] == sorted(free[:3])
    assert (rows[1]["dropped"], rows[2]["dropped"]) == ([2], [2, 4, 6])  # 7 scores lowest but is protected; 2 ties 6
    assert report["protected"]["layers"] == region and report["protected"]["spec"] == "uniform25"
    assert [r["layers"] for r in rows] == [8, 7, 5]
    per_layer = (rows[0]["parameters"] - rows[1]["parameters"])
    assert per_layer > 0 and rows[0]["parameters"] - rows[2]["parameters"] == 3 * per_layer
    for r in rows:
        e = json.loads((Path(r["eval_dir"]) / "eval.json").read_text())
        assert (e["accuracy"], e["samples"], e["text_eval"]["accuracy"]) == (r["accuracy"], 8, r["text_accuracy"])
        assert e["template"] == run_json["config"]["template"]  # a pruned model is evaluated as its source was
        assert e["max_length"] == run_json["config"]["max_length"]
        base_accuracy = rows[0]["accuracy"]  # 3 steps from a random projector: may be 0, then there is no ratio
        assert r["relative_accuracy"] == (pytest.approx(r["accuracy"] / base_accuracy) if base_accuracy else None)
        assert r["tokens_per_s"] > 0 and len(r["generate_s"]) == 2
    assert rows[0]["speedup"] == 1.0
    assert report["speed"]["prompts"] == 4 and report["speed"]["new_tokens"] == 4
    md = (out / "prune_report.md").read_text()
    assert md.count("\n| drop") == 2 and "| unpruned | - | 8 |" in md
    assert json.loads((out / prune.SWEEP_FILE).read_text())["drops"] == [1, 3]

    # healing: a pruned model trains again like any other; the region is resolved on its 5 layers
    pruned = out / "drop3"
    heal = tmp_path / "heal"
    res = run([sys.executable, "launch/sft.py", "--model", str(pruned), "--data", str(demo_dir / "sft_train.json"),
               "--region", "layers:1", "--output-dir", str(heal), "--max-steps", "2", "--micro-batch", "4",
               "--num-workers", "0", "--eval-max-samples", "4"],
              timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert json.loads((heal / "run.json").read_text())["region"]["layers"] == [1]
    before, after = load(pruned), load(heal)
    assert after.config.text_config.num_hidden_layers == 5
    for i, (a, b) in enumerate(zip(find_parts(after).layers, find_parts(before).layers)):
        same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert same == (i != 1), i  # only the region's layer changed
    # a rerun replaces the earlier sweep (its marker), and nothing else
    prune.run(str(trained), str(scores_file), [2], None, str(out))
    assert json.loads((out / prune.PRUNE_FILE).read_text())["dropped"] == sorted(free[:2])
    assert not (out / "drop1").exists()
