"""--tuner lora: peft adapters on the region's linears only, counted, trained on 2 ranks, saved twice over.

Analytical counts are written out from the configs' dimensions here, not computed by the code under test.
"""
import json
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from conftest import deepspeed_cmd, run
from lvlm_region.model import lora
from lvlm_region.data.demo import build_demo_model
from lvlm_region.model.families import find_parts
from lvlm_region.model.projector import PROJECTOR_FILE
from lvlm_region.model.trainable import apply_region, count_parameters
from lvlm_region.model.regions import resolve


def with_lora(model, spec, r, alpha=16, dropout=0.0):
    region = resolve(spec, len(find_parts(model).layers))
    cfg = lora.peft_config(model, region, r, alpha, dropout)
    lora.inject(model, cfg)
    return cfg, apply_region(model, region, "lora")


def test_adapters_only_on_the_region_linears_and_the_count_is_analytical():
    model = build_demo_model(vocab_size=160, image_token_id=4, pad_token_id=3, seed=0)
    cfg, counts = with_lora(model, "layers:1,5", r=4)
    # Demo LLM: hidden 128, MLP 256, 4 heads, 2 KV heads of 32 -> q 128x128, k 128x64, v 128x64, o 128x128,
    # gate/up 128x256, down 256x128: sum of (in + out) = 2048 per layer; r=4, 2 layers -> 16384.
    assert counts["layers"]["trainable"] == 4 * 2048 * 2 == lora.lora_parameter_count(cfg, model)
    assert counts["projector"]["trainable"] == counts["projector"]["total"] > 0  # the projector trains whole
    assert counts["all"]["trainable"] == 16384 + counts["projector"]["total"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    assert {n.split(".lora_")[0] for n in adapters} == {
        f"model.language_model.layers.{i}.{m}" for i in (1, 5) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")}  # never vision_tower.encoder.layers.1 / .5
    assert trainable - adapters == {n for n, _ in model.named_parameters()
                                    if n.startswith("model.multi_modal_projector.")}


def test_paper_recipe_on_llama3_8b_shapes_is_83_9m():
    # r=128 on the 8 paper layers of a Llama-3-8B-shaped LLM (4096 hidden, 14336 MLP, 32 heads, 8 KV heads of
    # 128): per layer 128 x (2x(4096+4096) + 2x(4096+1024) + 3x(4096+14336)) = 10,485,760; x 8 = 83,886,080.
    text = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=16)
    with torch.device("meta"):  # shapes only: no 8B weights in memory
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=5))
        cfg, counts = with_lora(model, "paper32", r=128, alpha=256, dropout=0.05)
    assert counts["layers"]["trainable"] == 83_886_080 == lora.lora_parameter_count(cfg, model)
    assert len(cfg.target_modules) == 8 * 7


def test_lora_needs_a_region_with_layers(demo_dir, tmp_path):
    res = run([sys.executable, "launch/sft.py", "--output-dir", str(tmp_path / "o"), "--region", "none", "--tuner",
               "lora"])
    assert res.returncode == 2
    assert "--tuner lora: region 'none' selects no decoder layer" in res.stderr
    assert "--region uniform25" in res.stderr and "--tuner full" in res.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was loaded or written


@pytest.mark.parametrize("zero,ckpt", [("2", []), ("3", ["--grad-ckpt"])])
def test_lora_trains_on_two_ranks_and_saves_adapter_and_merged_model(demo_dir, demo_sft_data, tmp_path, zero, ckpt):
    out = tmp_path / "lora"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--output-dir", str(out), *demo_sft_data, "--zero", zero, *ckpt,
                            "--tuner", "lora",
                            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.05", "--lr", "1e-2",
                            "--projector-lr", "1e-3", "--max-steps", "3", "--micro-batch", "4", "--num-workers", "0",
                            "--log-every", "1", "--eval-max-samples", "2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["parameters"]["layers"]["trainable"] == 16384  # uniform25 = layers 0 and 7, r=4 (see above)
    assert "16384 adapter parameters (r x (in + out) summed over them: 16384)" in res.stdout
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" not in r]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["projector_lr"] == pytest.approx(s["lr"] / 10) for s in steps) and steps[0]["lr"] > 0

    base = LlavaForConditionalGeneration.from_pretrained(demo_dir / "base_model")
    merged = LlavaForConditionalGeneration.from_pretrained(out)
    b, m = base.state_dict(), merged.state_dict()
    assert b.keys() == m.keys()  # a plain transformers checkpoint: no lora or base_layer keys
    changed = {k for k in b if not torch.equal(b[k], m[k])}
    region_linears = {f"model.language_model.layers.{i}.{n}.weight" for i in (0, 7) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    projector = {k for k in b if k.startswith("model.multi_modal_projector.")}
    assert changed == region_linears | projector  # norms of the region, other layers, vision, embeddings: identical

    # The adapter in peft's format on the base model, with the saved projector, is the merged model.
    adapter = out / lora.ADAPTER_DIR
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    with_adapter = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(demo_dir / "base_model"),
                                             adapter)
    find_parts(with_adapter.get_base_model()).projector.load_state_dict(load_file(adapter / PROJECTOR_FILE))
    assert load_file(adapter / PROJECTOR_FILE).keys() == load_file(out / PROJECTOR_FILE).keys()
    ids = torch.tensor([[1, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert count_parameters(merged)["all"]["total"] == count_parameters(base)["all"]["total"]


def test_lora_on_a_qwen2_5_vl_region_trains_on_two_ranks_and_merges(tmp_path):
    """Qwen2.5-VL under ZeRO-3: adapters on the region's decoder linears (never the vision blocks with the same
    index), the merger trained whole, and the merged export differs from the base exactly there."""
    from transformers import AutoModelForImageTextToText

    from helpers import qwen
    ckpt = qwen.build(str(tmp_path / "ckpt"), "qwen2_5_vl")
    data = qwen.write_data(str(tmp_path / "data"), n=8, text_every=4)
    out = tmp_path / "lora"
    res = run(deepspeed_cmd(2, "launch/sft.py", "--model", ckpt, "--data", data, "--output-dir", str(out), "--zero",
                            "3", "--region", "layers:1", "--tuner", "lora", "--lora-r", "2", "--lora-alpha", "4",
                            "--lr", "1e-2", "--max-steps", "2", "--micro-batch", "2", "--num-workers", "0"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Text LLM: hidden 32, MLP 64, 4 heads, 2 KV heads of 8: q 32x32, k 32x16, v 32x16, o 32x32, gate/up 32x64,
    # down 64x32: sum of (in + out) = 64 + 48 + 48 + 64 + 96 + 96 + 96 = 512; r=2, 1 layer -> 1024.
    assert json.loads((out / "run.json").read_text())["parameters"]["layers"]["trainable"] == 2 * 512 == 1024
    base = AutoModelForImageTextToText.from_pretrained(ckpt).state_dict()
    merged = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    region = {f"model.language_model.layers.1.{n}.weight" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert changed == region | {k for k in base if k.startswith("model.visual.merger.")}
