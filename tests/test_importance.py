"""Layer importance (launch/importance.py) on the demo's real tiny Llava: block influence against a direct computation
from output_hidden_states, identity layers scoring zero, one rank equal to two ZeRO-3 ranks, weight change against a
base, and region specs that pick layers by score."""
import json
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlamaConfig

from conftest import deepspeed_cmd, run
from lvlm_region.model import regions
from lvlm_region.model.families import find_parts
from lvlm_region.tools.importance import BlockInfluence, bi_scores, token_mask, weight_delta


@pytest.fixture(scope="module")
def base(demo_dir):
    return demo_dir / "base_model"


def text_batch(model, rows: int = 3, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.text_config.vocab_size, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, :4] = 0  # left padding: those positions must not count
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def test_bi_equals_direct_computation_and_identity_layers_score_zero(base):
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    layers = find_parts(model).layers
    batch = text_batch(model)
    hooks = BlockInfluence(layers)
    hooks.mask = token_mask(batch, "all", None)
    out = model(**batch, output_hidden_states=True)
    hooks.close()
    scores = bi_scores(hooks.sums.tolist(), hooks.counts.tolist())
    hs, m = out.hidden_states, batch["attention_mask"].bool()
    assert hooks.counts.tolist() == [float(m.sum())] * len(layers)
    # hidden_states[i] enters layer i and hidden_states[i + 1] leaves it, except the last entry, which is after the
    # final norm: the hooks read the last layer's own output, so only layers 0..L-2 compare directly.
    for i in range(len(layers) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)[m]
        assert scores[i] == pytest.approx(1 - float(cos.mean()), abs=1e-12)

    for i in (2, 5):  # identity layers: attention output and MLP down projections zeroed
        layers[i].self_attn.o_proj.weight.zero_()
        layers[i].mlp.down_proj.weight.zero_()
    hooks = BlockInfluence(layers)
    hooks.mask = token_mask(batch, "all", None)
    model(**batch)
    hooks.close()
    zeroed = bi_scores(hooks.sums.tolist(), hooks.counts.tolist())
    assert abs(zeroed[2]) < 1e-12 and abs(zeroed[5]) < 1e-12
    assert all(zeroed[i] > 1e-4 for i in (0, 1, 3, 4, 6, 7)), zeroed


def test_token_selection_splits_real_tokens_into_text_and_image():
    batch = {"input_ids": torch.tensor([[0, 7, 7, 3], [5, 7, 4, 4]]),
             "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
    img, txt, every = (token_mask(batch, t, 7) for t in ("image", "text", "all"))
    assert img.tolist() == [[False, True, True, False], [False, True, False, False]]
    assert txt.tolist() == [[False, False, False, True], [True, False, True, True]]
    assert (img | txt).equal(every) and not (img & txt).any()


def one_rank_and_two_zero3_ranks(flags: list[str], tmp_path) -> tuple[dict, dict]:
    """The scores files of launch/importance.py with ``flags``: one rank (tmp/one), two ZeRO-3 ranks (tmp/two)."""
    out = []
    for name, cmd in (("one", [sys.executable, "launch/importance.py"]),
                      ("two", deepspeed_cmd(2, "launch/importance.py") + ["--zero", "3"])):
        path = tmp_path / name / "scores.json"
        res = run([*cmd, *flags, "--output", str(path)], timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        out.append(json.loads(path.read_text()))
    return out[0], out[1]


def test_one_rank_equals_two_zero3_ranks(demo_dir, base, tmp_path):
    # 7 samples on 2 ranks: one rank scores 4, the other 3 and a masked repeat (same calls on both under ZeRO-3).
    flags = ["--model", str(base), "--data", str(demo_dir / "sft_eval.json"), "--samples", "7", "--micro-batch", "2",
             "--seed", "3"]
    one = tmp_path / "one" / "scores.json"
    a, b = one_rank_and_two_zero3_ranks(flags, tmp_path)
    assert (a["method"], a["layers"], a["samples"], a["tokens"], a["world_size"]) == ("bi", 8, 7, "all", 1)
    assert (b["world_size"], b["zero_stage"]) == (2, 3) and b["token_count"] == a["token_count"] > 7 * 16
    # equal to fp32 precision: the ranks batch other samples together, so each matmul sees other shapes (measured
    # differences ~2e-8 relative); a sample counted twice or missed changes token_count, asserted equal above
    assert b["scores"] == pytest.approx(a["scores"], rel=1e-6, abs=1e-9)
    assert all(0 <= s <= 2 for s in a["scores"]) and (tmp_path / "one" / "scores.png").stat().st_size > 0
    # the spec picks by these scores: the two highest, ties to the lower index
    want = sorted(sorted(range(8), key=lambda i: (-a["scores"][i], i))[:2])
    assert list(regions.resolve(f"top:2@{one}", 8).layers) == want


def test_delta_finds_the_changed_layers(base, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    layers = find_parts(model).layers
    with torch.no_grad():
        layers[1].mlp.up_proj.weight.mul_(1.5)  # ||0.5 W|| / ||layer||: > 0
        layers[6].input_layernorm.weight.add_(0.25)
    model.save_pretrained(tmp_path / "tuned")
    res = run([sys.executable, "launch/importance.py", "--model", str(tmp_path / "tuned"), "--method", "delta",
               "--base", str(base), "--output", str(tmp_path / "delta.json")], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    scores = json.loads((tmp_path / "delta.json").read_text())["scores"]
    assert [i for i, s in enumerate(scores) if s != 0] == [1, 6]
    ref = find_parts(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)).layers[1]
    norm = sum(float(p.double().pow(2).sum()) for p in ref.parameters()) ** 0.5
    want = 0.5 * float(ref.mlp.up_proj.weight.double().norm()) / norm
    assert scores[1] == pytest.approx(want, rel=1e-6)  # the saved 1.5 W is rounded to fp32
    assert weight_delta(str(tmp_path / "tuned"), str(base))["scores"] == scores
    assert list(regions.resolve(f"top:2@{tmp_path / 'delta.json'}", 8).layers) == [1, 6]
    assert list(regions.resolve(f"bottom:2@{tmp_path / 'delta.json'}+lm_head", 8).layers) == [0, 2]


def test_snr_equals_a_direct_computation_and_finds_a_structured_layer(base, tmp_path):
    """--method snr (no data): each matrix's SNR from numpy's singular values as Spectrum computes it, the layer's the
    mean over its seven linears. A layer whose matrices are made rank-1 signal plus small noise scores lowest: Spectrum
    divides the SNR by the largest singular value, which the rank-1 signal makes large."""
    import numpy as np

    from lvlm_region.tools.importance import layer_matrices, matrix_snr

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    layers = find_parts(model).layers
    g = torch.Generator().manual_seed(0)
    for w in layer_matrices(layers[5]):
        u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g)
        w.data.copy_(u @ v + 0.01 * torch.randn(w.shape, generator=g))
    model.save_pretrained(tmp_path / "m")
    res = run([sys.executable, "launch/importance.py", "--model", str(tmp_path / "m"), "--method", "snr", "--output",
               str(tmp_path / "snr.json")], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = json.loads((tmp_path / "snr.json").read_text())
    assert out["method"] == "snr" and out["matrices"] == [7] * 8

    def by_hand(w):
        s = np.linalg.svd(w.detach().double().numpy(), compute_uv=False)
        sigma = (np.quantile(s, 0.75) - np.quantile(s, 0.25)) / 1.349
        edge = sigma * (1 + np.sqrt(min(w.shape) / max(w.shape)))
        noise = s[s <= edge].sum() or s[-1]
        return s[s > edge].sum() / noise / s[0]

    for i in (0, 5):
        mats = layer_matrices(layers[i])
        assert [matrix_snr(w) for w in mats] == pytest.approx([by_hand(w) for w in mats], rel=1e-9)
        assert out["scores"][i] == pytest.approx(np.mean([by_hand(w) for w in mats]), rel=1e-6)
    assert out["scores"].index(min(out["scores"])) == 5
    assert list(regions.resolve(f"bottom:1.mlp@{tmp_path / 'snr.json'}", 8).layers) == [5]


def test_snr_counts_each_experts_matrices():
    from helpers import qwen
    from lvlm_region.tools.importance import layer_matrices

    layers = find_parts(qwen.model("qwen3_vl_moe")).layers
    # attention: q, k, v, o; an expert layer adds 4 experts' gate_up and down (the router is no nn.Linear)
    assert [len(layer_matrices(layer)) for layer in layers] == [4 + 8, 4 + 8, 4 + 3, 4 + 8]


def test_grad_equals_a_direct_computation_and_two_zero3_ranks(demo_dir, base, tmp_path):
    """--method grad on 5 text samples: per layer, the norm of the mean token loss's gradient on its weights, as plain
    autograd computes it on the same prepared samples, on one rank (ZeRO-2) and on two ZeRO-3 ranks alike."""
    import datasets

    from lvlm_region.model.loss import token_loss_sum
    from lvlm_region.tools.importance import sample_indices

    flags = ["--model", str(base), "--method", "grad", "--data", str(demo_dir / "text_eval.json"), "--samples", "5",
             "--micro-batch", "2", "--seed", "1"]
    a, b = one_rank_and_two_zero3_ranks(flags, tmp_path)
    assert (a["method"], a["samples"], b["world_size"], b["zero_stage"]) == ("grad", 5, 2, 3)
    assert b["token_count"] == a["token_count"] > 0
    assert b["scores"] == pytest.approx(a["scores"], rel=1e-4)
    # directly: the prepared samples the run scored, padded into one batch, the mean token loss, autograd
    ds = datasets.load_from_disk(str(tmp_path / "one" / "prepared" / "importance"))
    rows = [ds[i] for i in sample_indices(len(ds), 5, 1)]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    loss = token_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels) / a["token_count"]
    loss.backward()
    want = [float(sum(p.grad.double().pow(2).sum() for p in layer.parameters())) ** 0.5
            for layer in find_parts(model).layers]
    assert a["scores"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("flags,message", [
    (["--method", "delta"], "--method delta needs --base BASE_DIR"),
    (["--method", "gradient"], "--method 'gradient': choose one of bi, delta, snr, grad"),
    (["--tokens", "vision"], "--tokens 'vision': choose one of all, text, image"),
    (["--samples", "-1"], "--samples must be a whole number >= 0, got -1"),
])
def test_bad_input_is_refused(demo_dir, base, tmp_path, flags, message):
    res = run([sys.executable, "launch/importance.py", "--model", str(base), "--data",
               str(demo_dir / "sft_eval.json"), "--output", str(tmp_path / "s.json"), *flags], timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "s.json").exists()


def test_a_model_without_decoder_layers_is_refused_before_loading(tmp_path):
    LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path / "llm")  # config only: no weights to load
    res = run([sys.executable, "launch/importance.py", "--model", str(tmp_path / "llm"), "--data", "x.json",
               "--output", str(tmp_path / "s.json")], timeout=120)
    assert res.returncode == 2 and "cannot find its LLM's decoder layers" in res.stderr, res.stderr[-2000:]
