"""Qwen3-VL and Qwen3.5 (dense and MoE) on tiny random checkpoints written by transformers' own classes
(helpers/qwen.py): token counts and ids as Qwen3VLProcessor (the processor of all four) computes them, padded batches
and the masked dummy change no loss or generated token; Qwen3-VL's projector (merger + DeepStack mergers) as one
part, importance and pruning (which keeps the DeepStack layers); Qwen3.5's projector (the merger alone), its
linear-attention layers in regions, and pruning them; the MoE models' training loss with the router loss, and
pruning that keeps which layers have experts. The 2-rank ZeRO-3 runs are in test_train_distributed.py, the resumes
in test_resume.py, the FLOP models in test_flops.py.

Qwen3VLProcessor itself cannot be constructed here (its video processor needs torchvision), so the expected ids
are built as its ``__call__`` builds them: the chat template's text, each ``<|image_pad|>`` repeated
``image_grid_thw.prod() // merge_size**2`` times (its ``replace_image_token``, on what the image processor makes of
the decoded image), then the tokenizer."""
import json
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText
from safetensors.torch import load_file

from conftest import assert_dummy_changes_no_generation, run
from helpers import family_data, qwen
from lvlm_region.model import families
from lvlm_region.data import prepare
from lvlm_region.tools import prune
from lvlm_region.model.projector import PROJECTOR_FILE, export_projector, load_projector

SIZES = qwen.SIZES + [(300, 20), (20, 300), (500, 400)]


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe"])
def ckpt(request, tmp_path_factory):
    return qwen.build(str(tmp_path_factory.mktemp(request.param) / "ckpt"), request.param)


@pytest.fixture(scope="module")
def qwen3_vl_ckpt(tmp_path_factory):
    return qwen.build(str(tmp_path_factory.mktemp("qwen3_vl") / "ckpt"), "qwen3_vl")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return family_data.write(tmp_path_factory.mktemp("qwen3_data"), SIZES)


def test_token_counts_and_ids_are_what_qwen3vl_processor_makes(ckpt, data, tmp_path):
    enc, tok, _ = prepare.for_model(ckpt, "auto", 512)
    layout, ip = enc.layout, qwen.image_processor(AutoConfig.from_pretrained(ckpt).model_type.removesuffix("_moe"))
    assert (ip.patch_size, ip.merge_size) == (16, 2)
    seen = set()
    for w, h in SIZES:  # from the header size alone, as the processor's grid on the decoded image
        Image.new("RGB", (w, h), "red").save(tmp_path / "x.png")
        grid = ip(images=[Image.open(tmp_path / "x.png")], return_tensors="pt")["image_grid_thw"]
        n = int(grid.prod()) // 4
        assert layout.token_ids((w, h)) == [layout.start_id] + [layout.image_token_id] * n + [layout.end_id]
        seen.add(n)
    assert min(seen) == 4 and max(seen) == 16 and len(seen) >= 3
    path, folder = data
    ds = prepare.prepare(path, folder, enc, tok, str(tmp_path / "prep"))

    def expand(image):  # Qwen3VLProcessor.replace_image_token, with the grid the image processor makes of it
        n = int(ip(images=[image])["image_grid_thw"][0].prod()) // ip.merge_size ** 2
        return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
    family_data.assert_ids_as_the_processor_builds(ds, data, tok, "<|vision_start|><|image_pad|><|vision_end|>",
                                                   expand, "<|im_end|>")


def test_the_projector_is_the_merger_and_the_deepstack_mergers(tmp_path):
    """One part, set and counted together; stage 1's projector file carries both and loads into a fresh model."""
    from lvlm_region.model.regions import resolve
    from lvlm_region.model.trainable import apply_region
    model = qwen.model("qwen3_vl", seed=1)
    parts = families.find_parts(model)
    visual = model.model.visual
    inside = {id(p) for m in (visual.merger, visual.deepstack_merger_list) for p in m.parameters()}
    assert {id(p) for p in parts.projector.parameters()} == inside and len(visual.deepstack_merger_list) == 2
    counts = apply_region(model, resolve("layers:2-projector", 4, tied=True))
    assert counts["projector"]["trainable"] == 0 and not any(id(p) in inside for p in model.parameters()
                                                              if p.requires_grad)
    counts = apply_region(model, resolve("none", 4, tied=True))
    assert counts["projector"]["trainable"] == counts["projector"]["total"] == sum(
        p.numel() for p in model.parameters() if id(p) in inside)
    assert counts["vision"]["trainable"] == 0 and counts["vision"]["total"] > 0
    export_projector(model, model.state_dict(), str(tmp_path))
    saved = load_file(str(tmp_path / PROJECTOR_FILE))
    assert {k.split(".")[0] for k in saved} == {"merger", "deepstack"} and len(saved) == 3 * 6
    fresh = qwen.model("qwen3_vl", seed=2)
    assert not torch.equal(fresh.model.visual.deepstack_merger_list[1].linear_fc2.weight,
                           visual.deepstack_merger_list[1].linear_fc2.weight)
    assert load_projector(fresh, str(tmp_path)) == 18
    ours = dict(model.named_parameters())
    copied = [name for name, p in fresh.named_parameters() if id(ours[name]) in inside]
    assert len(copied) == 18 and all(torch.equal(dict(fresh.named_parameters())[n], ours[n]) for n in copied)


def test_padded_batches_and_the_masked_dummy_change_no_loss_or_generated_token(ckpt, data):
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    layout, tok, ds = family_data.items(ckpt, data)
    text, one, two = ds[0], ds[1], ds[2]
    assert "pixel_values" not in text and len(one["image_grid_thw"]) == 1 and len(two["image_grid_thw"]) == 2

    loss = family_data.loss_of(model, layout, tok)
    # Right padding, images of other sizes in one batch (DeepStack adds at each row's image tokens): summed losses.
    assert loss([text, one, two]) == pytest.approx(loss([text]) + loss([one]) + loss([two]), rel=1e-5)
    dummy = layout.dummy()  # a text-only batch: the masked dummy (and its DeepStack features) change nothing
    assert loss([text, ds[3]], dummy) == pytest.approx(loss([text, ds[3]]), rel=1e-6)
    prompt = torch.tensor(tok.apply_chat_template([{"role": "user", "content": "Describe"}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
    assert_dummy_changes_no_generation(model, layout, tok, prompt)


@torch.no_grad()
def test_importance_then_pruning_keeps_the_deepstack_layers(qwen3_vl_ckpt, data, tmp_path):
    """launch/importance.py scores the layers; pruning never drops decoder layers 0 and 1 (the DeepStack features
    enter after them by index), refuses a K that would need them, and the pruned model loads and generates the same
    with and without its cache."""
    path, folder = data
    scores = tmp_path / "scores.json"
    res = run([sys.executable, "launch/importance.py", "--model", qwen3_vl_ckpt, "--data", path, "--image-folder",
               folder, "--samples", "8", "--output", str(scores)], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    bi = json.loads(scores.read_text())
    bi["scores"] = [0.0, 0.01, 0.5, 0.2]  # the DeepStack layers score lowest: pruning must still keep them
    scores.write_text(json.dumps(bi))
    with pytest.raises(prune.PruneError, match=r"--drop 3: the model has 4 decoder layers, 0 of them in the "
                                               r"protected region 'none' \(--protect none\), and 2 more it keeps "
                                               r"because the model adds its 2 DeepStack features after decoder "
                                               r"layers 0-1 by index \(layers \[0, 1\]\), so at most 2 can be dropped"):
        prune.make_plan(qwen3_vl_ckpt, str(scores), [3], "none")
    out = tmp_path / "pruned"
    prune.run(qwen3_vl_ckpt, str(scores), [1], "none", str(out))
    record = json.loads((out / prune.PRUNE_FILE).read_text())
    assert record["dropped"] == [3] and record["pinned"]["layers"] == [0, 1]
    assert AutoConfig.from_pretrained(out).text_config.num_hidden_layers == 3
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    ids = torch.randint(16, 30, (1, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=model.config.text_config.pad_token_id)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw, use_cache=False))


def test_qwen3_5_projector_is_the_merger_and_regions_take_linear_attention_layers_whole():
    """Qwen3.5's tower has no DeepStack: the merger alone is the projector. A region's layer is the whole decoder
    layer whatever its mixer: uniform25 of the 4 layers is layer 1, a Gated DeltaNet layer, with its convolution,
    decay (A_log, dt_bias), gated norm and projections."""
    from lvlm_region.model.regions import resolve
    from lvlm_region.model.trainable import apply_region
    model = qwen.model("qwen3_5")
    parts = families.find_parts(model)
    assert parts.projector is model.model.visual.merger and parts.tied
    apply_region(model, resolve("uniform25", 4, tied=True))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    layer1 = {f"model.language_model.layers.1.{n}" for n, _ in model.model.language_model.layers[1].named_parameters()}
    merger = {f"model.visual.merger.{n}" for n, _ in model.model.visual.merger.named_parameters()}
    assert trained == layer1 | merger
    assert {f"model.language_model.layers.1.linear_attn.{n}" for n in ("conv1d.weight", "A_log", "dt_bias")} <= trained


@torch.no_grad()
def test_qwen3_5_importance_then_pruning_drops_linear_attention_layers(data, tmp_path):
    """launch/importance.py scores Qwen3.5's layers; dropping layers 0 and 3 (Gated DeltaNet) leaves the attention
    layer and one linear-attention layer: the pruned config's layer_types follow, and the model generates the same
    with and without its cache (the conv and recurrent states, indexed by the renumbered layers)."""
    ckpt = qwen.build(str(tmp_path / "ckpt"), "qwen3_5")
    path, folder = data
    scores = tmp_path / "scores.json"
    res = run([sys.executable, "launch/importance.py", "--model", ckpt, "--data", path, "--image-folder", folder,
               "--samples", "8", "--output", str(scores)], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    bi = json.loads(scores.read_text())
    assert len(bi["scores"]) == 4 and all(0 < x < 2 for x in bi["scores"])
    bi["scores"] = [0.01, 0.5, 0.4, 0.02]  # the two outer linear-attention layers score lowest
    scores.write_text(json.dumps(bi))
    out = tmp_path / "pruned"
    prune.run(ckpt, str(scores), [2], "none", str(out))
    assert json.loads((out / prune.PRUNE_FILE).read_text())["dropped"] == [0, 3]
    text = AutoConfig.from_pretrained(out).text_config
    assert text.num_hidden_layers == 2 and text.layer_types == ["linear_attention", "full_attention"]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    ids = torch.randint(16, 30, (1, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=model.config.text_config.pad_token_id)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw, use_cache=False))


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_moe_training_loss_is_the_models_own_loss_with_its_router_loss(family, data, tmp_path):
    """The trainer's loss on an MoE model (its token loss plus loss.router_loss) is what the model's own forward
    returns as loss with labels: the mean token loss plus router_aux_loss_coef x its load-balancing loss, over a
    padded batch with images of two sizes and a text-only row; the router loss is not zero."""
    from lvlm_region.data.batches import collate
    from lvlm_region.model.loss import loss_positions, router_loss, token_loss_sum, valid_tokens
    ckpt = qwen.build(str(tmp_path / "ckpt"), family)
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    layout, tok, ds = family_data.items(ckpt, data)
    b = collate([ds[0], ds[1], ds[2]], tok.pad_token_id)
    with torch.no_grad():
        out = model(**layout.model_inputs(b), logits_to_keep=loss_positions(b["labels"]), use_cache=False)
        ours = token_loss_sum(out.logits, b["labels"]) / valid_tokens(b["labels"]) + router_loss(out, model.config)
        theirs = model(**layout.model_inputs(b), labels=b["labels"], use_cache=False)
    assert float(router_loss(out, model.config)) > 0 and float(theirs.aux_loss) > 0
    assert float(ours) == pytest.approx(float(theirs.loss), rel=1e-5)


@torch.no_grad()
def test_moe_importance_and_pruning_keeps_which_layers_have_experts(data, tmp_path):
    """launch/importance.py scores Qwen3-VL MoE's layers. With a dense MLP in layer 2 (mlp_only_layers), dropping
    layer 2 leaves layers 0, 1, 3, all with experts, so the pruned config has no dense layer; dropping layer 3 instead
    keeps layer 2 dense. Both load (the layers' weights match their configs) and generate the same with and without
    the cache."""
    from transformers import AutoConfig
    ckpt = qwen.build(str(tmp_path / "ckpt"), "qwen3_vl_moe")
    res = run([sys.executable, "launch/importance.py", "--model", ckpt, "--data", data[0], "--image-folder", data[1],
               "--samples", "8", "--output", str(tmp_path / "bi.json")], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    bi = json.loads((tmp_path / "bi.json").read_text())
    assert (bi["layers"], bi["samples"]) == (4, 8) and all(0 < x < 2 for x in bi["scores"])
    for scores, dense in (([0.5, 0.5, 0.01, 0.3], []), ([0.5, 0.5, 0.3, 0.01], [2])):
        path = tmp_path / "scores.json"
        path.write_text(json.dumps({"method": "bi", "scores": scores}))
        out = tmp_path / f"pruned{len(dense)}"
        prune.run(ckpt, str(path), [1], "none", str(out))
        text = AutoConfig.from_pretrained(out).text_config
        assert (text.num_hidden_layers, text.mlp_only_layers, text.decoder_sparse_step) == (3, dense, 1)
        model = AutoModelForImageTextToText.from_pretrained(out).eval()
        layers = model.model.language_model.layers
        assert [hasattr(layer.mlp, "experts") for layer in layers] == [i not in dense for i in range(3)]
        ids = torch.randint(16, 30, (1, 8), generator=torch.Generator().manual_seed(1))
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  pad_token_id=text.pad_token_id)
        assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw, use_cache=False))


def test_a_qwen3_vl_moe_checkpoint_in_transformers_layout_is_refused_under_zero3_before_loading(data, tmp_path):
    """What transformers 5's save_pretrained writes (experts x 2 inter x hidden) cannot load under ZeRO-3
    (families/qwen3_vl_moe.py): refused from the safetensors header, naming the fix, before any weights load."""
    ckpt = tmp_path / "ckpt"
    tok = qwen.tokenizer("qwen3_vl_moe")
    qwen.model("qwen3_vl_moe", tok=tok).save_pretrained(ckpt)  # transformers' own layout
    tok.save_pretrained(ckpt)
    qwen.image_processor("qwen3_vl").save_pretrained(ckpt)
    path, folder = data
    flags = ["--model", str(ckpt), "--data", path, "--image-folder", folder, "--max-steps", "1",
             "--output-dir", str(tmp_path / "out")]
    res = run([sys.executable, "launch/sft.py", *flags, "--zero", "3"], timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert (f"--model {ckpt} stores its experts as transformers 5 writes them "
            "(model.language_model.layers.0.mlp.experts.gate_up_proj: [4, 16, 32], experts x 2 inter x hidden)"
            ) in res.stderr and "with --zero 2" in res.stderr
    assert "Loading weights" not in res.stdout + res.stderr
