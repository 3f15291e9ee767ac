"""One region mechanism across the image-text-to-text families transformers ships, on tiny random configs.

The LLM has 6 decoder layers and the vision encoder 6 layers too, so every selected index also exists in the
vision tower: the region must pick exactly the decoder's layers (and the projector), never the vision layers.
"""
import re

import pytest
import transformers as T
from torch import nn

from lvlm_region.model.families import find_parts
from lvlm_region.model.trainable import apply_region, count_parameters
from lvlm_region.model.regions import resolve

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=4, image_size=28, patch_size=14)
SIGLIP = dict(CLIP, model_type="siglip_vision_model")
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True}
QWEN3_VISION = dict(depth=6, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=16,
                    num_position_embeddings=64, deepstack_visual_indexes=[1, 3])


def llava_like(config_cls, model_cls, **extra):
    return model_cls(config_cls(text_config=dict(TEXT, model_type="llama"), vision_config=CLIP, **extra))


FAMILIES = {
    "llava": lambda: llava_like(T.LlavaConfig, T.LlavaForConditionalGeneration),
    "llava_next": lambda: llava_like(T.LlavaNextConfig, T.LlavaNextForConditionalGeneration,
                                     image_grid_pinpoints=[[28, 28]]),
    "llava_onevision": lambda: T.LlavaOnevisionForConditionalGeneration(T.LlavaOnevisionConfig(
        text_config=dict(TEXT, model_type="qwen2"), vision_config=SIGLIP, image_grid_pinpoints=[[28, 28]])),
    "qwen2_vl": lambda: T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(
        text_config=dict(TEXT, model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=6, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2))),
    "qwen2_5_vl": lambda: T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
        text_config=dict(TEXT, model_type="qwen2_5_vl_text",
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=6, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, fullatt_block_indexes=[5]))),
    "qwen3_vl": lambda: T.Qwen3VLForConditionalGeneration(T.Qwen3VLConfig(
        text_config=dict(TEXT, head_dim=8, rope_parameters=MROPE), vision_config=dict(QWEN3_VISION))),
    "qwen3_vl_moe": lambda: T.Qwen3VLMoeForConditionalGeneration(T.Qwen3VLMoeConfig(
        text_config=dict(TEXT, head_dim=8, rope_parameters=MROPE, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, decoder_sparse_step=1), vision_config=dict(QWEN3_VISION))),
    "qwen3_5": lambda: T.Qwen3_5ForConditionalGeneration(T.Qwen3_5Config(
        text_config=dict(TEXT, head_dim=8, rope_parameters=MROPE, linear_key_head_dim=8, linear_value_head_dim=8,
                         linear_num_key_heads=2, linear_num_value_heads=4),
        vision_config=dict(QWEN3_VISION, deepstack_visual_indexes=[]))),
    "internvl": lambda: T.InternVLForConditionalGeneration(T.InternVLConfig(
        text_config=dict(TEXT, model_type="qwen2"), vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=[28, 28],
            patch_size=[14, 14]), image_seq_length=1)),
    "smolvlm": lambda: T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(
        text_config=dict(TEXT, model_type="llama"), vision_config=dict(SIGLIP, model_type="smolvlm_vision"))),
    "idefics3": lambda: T.Idefics3ForConditionalGeneration(T.Idefics3Config(
        text_config=dict(TEXT, model_type="llama"), vision_config=dict(SIGLIP, model_type="idefics3_vision"))),
    "paligemma": lambda: T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
        text_config=dict(TEXT, model_type="gemma", head_dim=8), vision_config=SIGLIP, projection_dim=32)),
    "gemma3": lambda: T.Gemma3ForConditionalGeneration(T.Gemma3Config(
        text_config=dict(TEXT, model_type="gemma3_text", head_dim=8, sliding_window=16), vision_config=SIGLIP,
        mm_tokens_per_image=4)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_region_selects_decoder_layers_only(family):
    model = FAMILIES[family]()
    parts = find_parts(model)
    assert len(parts.layers) == 6 and parts.layers is model.get_decoder().layers
    counts = apply_region(model, resolve("layers:1,3", 6))  # fails if any parameter belongs to no part
    want = {id(p) for i in (1, 3) for p in parts.layers[i].parameters()}
    want |= {id(p) for p in parts.projector.parameters()} | {id(p) for p in parts.projector_extra}
    assert {id(p) for p in model.parameters() if p.requires_grad} == want
    owners = parts.owners()
    vision_params = [p for p in parts.vision.parameters() if owners[id(p)] == "vision"]
    assert vision_params and not any(p.requires_grad for p in vision_params)
    assert counts["projector"]["trainable"] == counts["projector"]["total"] > 0
    assert counts["vision"]["trainable"] == 0 and counts["all"]["total"] == sum(p.numel() for p in model.parameters())
    assert counts["layers"]["trainable"] == sum(p.numel() for i in (1, 3) for p in parts.layers[i].parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_sublayer_region_trains_only_that_module_of_its_layers(family):
    """layers:1,3.mlp / .attn: exactly those layers' MLP (token mixer) parameters and the projector train; with the
    LoRA tuner, adapters only on those modules' linears."""
    from lvlm_region.model import lora
    from lvlm_region.model.families import family_of
    for sub in ("mlp", "attn"):
        model = FAMILIES[family]()
        parts, fam = find_parts(model), family_of(model)
        region = resolve(f"layers:1,3.{sub}", 6)
        counts = apply_region(model, region)
        modules = [fam.sublayer(parts.layers[i], sub) for i in (1, 3)]
        assert all(m is not None and m is not parts.layers[i] for m, i in zip(modules, (1, 3)))
        want = {id(p) for m in modules for p in m.parameters()}
        want |= {id(p) for p in parts.projector.parameters()} | {id(p) for p in parts.projector_extra}
        assert {id(p) for p in model.parameters() if p.requires_grad} == want
        assert 0 < counts["layers"]["trainable"] < sum(p.numel() for i in (1, 3) for p in parts.layers[i].parameters())
        if not fam.trains:
            continue
        model = FAMILIES[family]()
        if family == "qwen3_vl_moe" and sub == "mlp":  # its routed experts are 3-D weights, its router no nn.Linear
            with pytest.raises(ValueError, match="selects no linear layer to put LoRA on"):
                lora.peft_config(model, region, 4, 8, 0.0)
            continue
        lora.inject(model, lora.peft_config(model, region, 4, 8, 0.0))
        apply_region(model, region, "lora")
        adapters = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
        assert adapters and all(re.search(r"\blayers\.(1|3)\.", n) and (".mlp." if sub == "mlp" else "attn.") in n
                                for n in adapters), sorted(adapters)


def test_unrecognised_model_names_what_was_looked_for():
    model = T.LlamaForCausalLM(T.LlamaConfig(**TEXT))
    with pytest.raises(ValueError) as e:
        find_parts(model)
    msg = str(e.value)
    assert "LlamaForCausalLM is not a recognised vision-language model" in msg
    assert "model.vision_tower + model.multi_modal_projector" in msg and "model.visual + model.visual.merger" in msg


def test_llava_next_image_newline_trains_with_the_projector():
    model = FAMILIES["llava_next"]()
    parts = find_parts(model)
    assert len(parts.projector_extra) == 1 and isinstance(parts.projector_extra[0], nn.Parameter)
    apply_region(model, resolve("uniform25-projector", 6))
    assert not parts.projector_extra[0].requires_grad
    assert count_parameters(model)["projector"]["trainable"] == 0


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"gemma3", "idefics3", "internvl", "llava",
                                                                     "llava_next", "llava_onevision", "qwen2_vl",
                                                                     "qwen2_5_vl", "qwen3_5", "qwen3_5_moe",
                                                                     "qwen3_vl", "qwen3_vl_moe", "smolvlm"}))
def test_training_a_family_without_a_data_path_is_refused_before_loading(tmp_path, family):
    """Only the config is on disk: the refusal comes before any processor, tokenizer or weights are read."""
    from lvlm_region.data.prepare import for_model

    FAMILIES[family]().config.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        for_model(str(tmp_path), "auto", 256)
    msg = str(e.value)
    assert f"--model {tmp_path} is a {T.AutoConfig.from_pretrained(tmp_path).model_type} model" in msg
    assert "training it is not supported yet" in msg
    assert ("Supported for training: gemma3, idefics3, internvl, llava, llava_next, llava_onevision, qwen2_vl, "
            "qwen2_5_vl, qwen3_5, qwen3_5_moe, qwen3_vl, qwen3_vl_moe, smolvlm") in msg


def test_default_aspect_of_an_assembled_llava_is_llavas_whatever_family_registers_first():
    from lvlm_region.model import families
    assert families.FAMILIES[0].model_types == ("gemma3",)  # the first trainable family by module name
    assert (families.default_aspect("pretrain", None), families.default_aspect("sft", None)) == ("square", "pad")
    assert (families.default_aspect("pretrain", "gemma3"), families.default_aspect("sft", "gemma3")) == ("square",
                                                                                                          "square")
