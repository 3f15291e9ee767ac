"""Freezing by region on a real (tiny, random) LlavaForConditionalGeneration, and projector import."""
import re

import pytest
import torch
from safetensors.torch import save_file

from lvlm_region.data.demo import build_demo_model
from lvlm_region.model.families import find_parts
from lvlm_region.model.projector import PROJECTOR_FILE, export_projector, load_projector
from lvlm_region.model.trainable import apply_region
from lvlm_region.model.regions import resolve


@pytest.fixture(scope="module")
def model():
    return build_demo_model(vocab_size=160, image_token_id=4, pad_token_id=3, seed=0)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expected_names(model, layers, parts):
    """Expected trainable names from the *in-memory* naming of transformers 5 (written out, not derived)."""
    pats = [rf"model\.language_model\.layers\.{i}\." for i in layers]
    part_pats = {"projector": r"model\.multi_modal_projector\.", "vision": r"model\.vision_tower\.",
                 "embed": r"model\.language_model\.embed_tokens\.", "norm": r"model\.language_model\.norm\.",
                 "lm_head": r"lm_head\."}
    pats += [part_pats[p] for p in parts]
    return {n for n, _ in model.named_parameters() if any(re.match(p, n) for p in pats)}


@pytest.mark.parametrize("spec,layers,parts", [
    ("none", [], ["projector"]),
    ("uniform25", [0, 7], ["projector"]),
    ("layers:1,5", [1, 5], ["projector"]),
    ("first:3+lm_head+norm", [0, 1, 2], ["projector", "lm_head", "norm"]),
    ("full-projector+embed+vision", list(range(8)), ["embed", "vision"]),
])
def test_exactly_intended_parameters_require_grad(model, spec, layers, parts):
    counts = apply_region(model, resolve(spec, 8))
    got = trainable_names(model)
    assert got == expected_names(model, layers, parts)
    # layers.1 must never drag in layers.1x, nor vision-tower layers with the same index
    assert not any(n.startswith("model.vision_tower.") for n in got) or "vision" in parts
    assert counts["all"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["all"]["total"] == sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in find_parts(model).layers[0].parameters())
    assert counts["layers"]["trainable"] == per_layer * len(layers)


def test_region_depth_mismatch_is_refused(model):
    with pytest.raises(ValueError, match="resolved for 16 layers, the model has 8"):
        apply_region(model, resolve("uniform25", 16))


def test_projector_round_trip_and_errors(model, tmp_path):
    src = build_demo_model(vocab_size=160, image_token_id=4, pad_token_id=3, seed=1)
    export_projector(src, src.state_dict(), str(tmp_path))
    load_projector(model, str(tmp_path))
    for (k, a), b in zip(find_parts(model).projector.state_dict().items(),
                         find_parts(src).projector.state_dict().values()):
        assert torch.equal(a, b), k
    bad = {k: v[..., :3].contiguous() for k, v in find_parts(src).projector.state_dict().items()}
    save_file(bad, str(tmp_path / PROJECTOR_FILE))
    with pytest.raises(ValueError, match=r"projector tensor linear_1.weight has shape \(128, 3\), the model expects "
                                         r"\(128, 64\)"):
        load_projector(model, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no projector.safetensors"):
        load_projector(model, str(tmp_path / "missing"))


def test_attention_choice_and_fallbacks():
    from lvlm_region.model.load import resolve_attention
    assert resolve_attention("eager", False, "fp32") == ("eager", None)
    assert resolve_attention("flash_attention_2", False, "fp32") == (
        "sdpa", "flash_attention_2 needs a GPU; using sdpa on CPU")
    assert resolve_attention("flash_attention_2", True, "fp32")[1] == (
        "flash_attention_2 needs bf16 or fp16, not fp32; using sdpa")
    with pytest.raises(ValueError, match="--attn must be one of flash_attention_2, sdpa, eager, got 'flash'"):
        resolve_attention("flash", False, "fp32")


def llava_mm_projector(path, shapes, dtype=torch.bfloat16, seed=0):
    """An mm_projector.bin as LLaVA / Bunny write it: torch.save of {model.mm_projector.<i>.weight|bias}."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, (out_f, in_f) in zip((0, 2), shapes):
        tensors[f"model.mm_projector.{index}.weight"] = torch.randn(out_f, in_f, generator=g).to(dtype)
        tensors[f"model.mm_projector.{index}.bias"] = torch.randn(out_f, generator=g).to(dtype)
    torch.save(tensors, path)
    return tensors


def test_llava_mm_projector_imports_onto_linear_1_and_2(tmp_path):
    from lvlm_region.model.load import skeleton
    from lvlm_region.model.projector import import_projector, read_mm_projector
    model = build_demo_model(vocab_size=160, image_token_id=4, pad_token_id=3, seed=0)
    src = llava_mm_projector(tmp_path / "mm_projector.bin", [(128, 64), (128, 128)])  # vision 64 -> LLM 128
    tensors = read_mm_projector(str(tmp_path / "mm_projector.bin"), find_parts(skeleton(model.config)).projector)
    assert sorted(tensors) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    assert import_projector(model, tensors) == 4
    proj = model.model.multi_modal_projector
    assert torch.equal(proj.linear_1.weight, src["model.mm_projector.0.weight"].float())
    assert torch.equal(proj.linear_2.bias, src["model.mm_projector.2.bias"].float())


def test_mm_projector_of_another_model_is_refused_with_the_shapes(tmp_path):
    from lvlm_region.model.load import skeleton
    from lvlm_region.model.projector import read_mm_projector
    model = build_demo_model(vocab_size=160, image_token_id=4, pad_token_id=3, seed=0)
    file = tmp_path / "mm_projector.bin"
    llava_mm_projector(file, [(4096, 1024), (4096, 4096)])  # LLaVA-1.5-7B's: CLIP-L 1024 -> Vicuna 4096
    with pytest.raises(ValueError) as e:
        read_mm_projector(str(file), find_parts(skeleton(model.config)).projector)
    msg = str(e.value)
    assert f"--init-projector {file}" in msg
    assert "(4096, 1024)" in msg and "(128, 64)" in msg and "linear_1, linear_2" in msg
    assert "another LLM width or vision tower" in msg
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, file)
    with pytest.raises(ValueError, match=r"no model\.mm_projector\.<i>\.weight keys \(found \['model\.embed_tokens"):
        read_mm_projector(str(file), find_parts(skeleton(model.config)).projector)


def test_llava_hf_checkpoint_in_the_published_key_layout_loads(tmp_path):
    # llava-hf/llava-1.5-7b-hf was written by transformers 4.x: language_model.model.*, language_model.lm_head.*,
    # vision_tower.*, multi_modal_projector.* at the top level. load_model must read that layout as it is.
    from lvlm_region.model.load import load_model
    model = build_demo_model(vocab_size=160, image_token_id=4, pad_token_id=3, seed=0)
    model.config.save_pretrained(tmp_path)
    legacy = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        else:
            k = k[len("model."):]  # model.vision_tower.* / model.multi_modal_projector.*
        legacy[k] = v.contiguous()
    assert any(k.startswith("language_model.model.layers.") for k in legacy)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(str(tmp_path), torch.float32).state_dict()
    want = model.state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)


def test_token_loss_sum_counts_only_labelled_positions():
    import torch
    import torch.nn.functional as F

    from lvlm_region.model.loss import token_loss_sum, valid_tokens
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100, 5], [-100, 7, -100, -100, -100, -100]])
    want = sum(F.cross_entropy(logits[b, t - 1].float()[None], labels[b, t][None], reduction="sum")
               for b in range(2) for t in range(1, 6) if labels[b, t] != -100)
    got = token_loss_sum(logits, labels)
    torch.testing.assert_close(got, want)
    assert valid_tokens(labels) == 4
    got.backward()
    grad = logits.grad
    assert grad.dtype == torch.bfloat16 and grad[:, -1].abs().sum() == 0  # the last position predicts nothing
    assert grad[0, 0].abs().sum() == 0 and grad[0, 1].abs().sum() > 0  # labels[0, 1] ignored; labels[0, 2] = 3 counts
    assert token_loss_sum(logits, torch.full_like(labels, -100)) == 0  # nothing trained: zero, not NaN


def test_logits_only_at_trained_positions_give_the_same_loss_and_gradients():
    """logits_to_keep=loss_positions(labels): the LM head runs on the N trained positions ([N, V] logits) and the
    loss and every gradient equal those of full [B, T, V] logits; a batch with nothing trained gives 0."""
    import torch

    from lvlm_region.model.loss import loss_positions, token_loss_sum, valid_tokens
    model = build_demo_model(vocab_size=160, image_token_id=4, pad_token_id=3, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 150, (3, 14), generator=g)
    ids[:, 1:5] = 4  # each row's image
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 9:14], labels[1, 6:8], labels[2, 12:14] = ids[0, 9:14], ids[1, 6:8], ids[2, 12:14]
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # row 1 right-padded

    def run(keep):
        model.zero_grad()
        extra = {"logits_to_keep": loss_positions(labels)} if keep else {}
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, **extra).logits
        loss = token_loss_sum(logits, labels)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return logits.shape, loss.detach(), grads

    full_shape, full_loss, full_grads = run(False)
    kept_shape, kept_loss, kept_grads = run(True)
    assert full_shape == (3, 14, 160) and kept_shape == (valid_tokens(labels), 160) == (5 + 2 + 2, 160)
    torch.testing.assert_close(kept_loss, full_loss, rtol=1e-6, atol=1e-6)
    assert kept_grads.keys() == full_grads.keys()
    for k in full_grads:
        torch.testing.assert_close(kept_grads[k], full_grads[k], rtol=1e-5, atol=1e-6)
    none = torch.full_like(labels, -100)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=loss_positions(none)).logits
    assert logits.shape == (0, 160) and token_loss_sum(logits, none) == 0
