"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 checkpoints in the real layout, and data with images of
several sizes.

The checkpoint is what save_pretrained writes for the real models: config.json (Qwen2VLConfig ... with its image,
vision-start and vision-end token ids), model.safetensors, the tokenizer with Qwen's chat template (which writes
``<|vision_start|><|image_pad|><|vision_end|>`` for an image part and passes string content through), and
preprocessor_config.json of Qwen2VLImageProcessor (min / max pixels lowered so images give 4 to 16 tokens; Qwen3-VL's
16-pixel patches as its preprocessor_config.json has them).
"""
import json
import os

import torch
import transformers as T
from PIL import Image

from helpers.word_tokenizer import SPECIAL, word_tokenizer

# Qwen2-VL-Instruct's chat template as its tokenizer_config.json has it (written out here from its structure: the
# default system prompt, <|vision_start|><|image_pad|><|vision_end|> for an image part, string content as is).
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if "
    "add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif "
    "content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if "
    "add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif "
    "'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3-VL-Instruct's chat template (tools left out): no default system prompt, an image part as Qwen2-VL's.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' }}{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for content in message.content %}{%- if content.type == 'image' or 'image' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif -%}<|vision_start|><|image_pad|><|vision_end|>{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for item in message.content %}{%- if 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- endif %}")
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = ("system user assistant You are a helpful assistant. What color is the shape? red green blue yellow "
         "square circle triangle Which shape is it? Describe")
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # 4 .. 16 image tokens (28 x 28 pixels per token)
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_5": 16, "qwen3_vl_moe": 16,
         "qwen3_5_moe": 16}  # Qwen3-VL / 3.5: 32 x 32 pixels per token
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, max_position_embeddings=512)
VISION = {"qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2),
          "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                             patch_size=14, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1]),
          # DeepStack from both vision layers (the released models take 3 of 24-27); an 8 x 8 learned position grid
          "qwen3_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
          # Qwen3-VL's tower without DeepStack
          "qwen3_5": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                          patch_size=16, spatial_merge_size=2, num_position_embeddings=64)}
# Qwen3-VL's LLM (Qwen3: q / k norms, head_dim set) with interleaved M-RoPE; tied, as Qwen3-VL-2B / 4B.
TEXT3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=512, rope_parameters={
                 "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True})

# Qwen3.5's LLM: Gated DeltaNet (linear attention) layers and gated attention layers (layer 2; the released models
# put one every 4 layers), small linear heads (2 key heads shared by 4 value heads, as 16 / 32 in the released
# models); partial rotary (half of a 16-wide head; the released models rotate a quarter of 256) with interleaved
# M-RoPE; tied, as the small Qwen3.5 models.
TEXT3_5 = dict(TEXT3, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
               linear_num_value_heads=4, linear_conv_kernel_dim=4,
               layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                "mrope_interleaved": True, "partial_rotary_factor": 0.5})

# The MoE LLMs: 4 experts of width 8, 2 per token, and the router's load-balancing loss on (as the released configs
# can ask with output_router_logits; weighted 0.01 here so that it shows). Qwen3-VL MoE's layer 2 is a dense MLP
# (mlp_only_layers); Qwen3.5 MoE adds a shared expert to every layer. 2 x 8 is not the hidden size 32: transformers
# tells the experts' released layout from its own by their shapes, which a square gate_up_proj would not show.
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, output_router_logits=True,
           router_aux_loss_coef=0.01)
TEXT3_MOE = dict(TEXT3, **MOE, decoder_sparse_step=1, mlp_only_layers=[2])
TEXT3_5_MOE = dict({k: v for k, v in TEXT3_5.items() if k != "intermediate_size"}, **MOE,
                   shared_expert_intermediate_size=16)
FAMILY_TEXT = {"qwen3_vl": TEXT3, "qwen3_5": TEXT3_5, "qwen3_vl_moe": TEXT3_MOE, "qwen3_5_moe": TEXT3_5_MOE}


def tokenizer(family: str = "qwen2_vl"):
    if family in ("qwen3_5", "qwen3_5_moe"):
        return qwen3_5_tokenizer()
    template = QWEN3_TEMPLATE if family in ("qwen3_vl", "qwen3_vl_moe") else QWEN_TEMPLATE
    tok = word_tokenizer(WORDS, bos=None, eos="<|im_end|>", chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[4:] + VISION_TOKENS})
    return tok


def qwen3_5_tokenizer():
    """transformers' Qwen3_5Tokenizer (byte-level BPE behind Qwen's pre-tokenizer split; what AutoTokenizer builds for
    a qwen3_5 checkpoint from its vocab and merges), its vocab and merges learnt here from WORDS, each word on its own
    and after a space, so every word the test data answers with is one token."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    corpus = [w for w in WORDS.split() for w in (w, " " + w)] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    learnt = json.loads(bpe.to_str())["model"]
    tok = T.Qwen3_5Tokenizer(vocab=learnt["vocab"], merges=[tuple(m) for m in learnt["merges"]],
                             eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"] + VISION_TOKENS})
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def model(family: str = "qwen2_vl", seed: int = 0, tok=None):
    """A tiny random ``family`` (qwen2_vl | qwen2_5_vl | qwen3_vl | qwen3_5, and their _moe) model whose special token
    ids are the tokenizer's."""
    tok = tok or tokenizer(family)
    ids = dict(zip(VISION_TOKENS, tok.convert_tokens_to_ids(VISION_TOKENS)))
    config_cls, model_cls = {"qwen2_vl": (T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration),
                             "qwen2_5_vl": (T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration),
                             "qwen3_vl": (T.Qwen3VLConfig, T.Qwen3VLForConditionalGeneration),
                             "qwen3_5": (T.Qwen3_5Config, T.Qwen3_5ForConditionalGeneration),
                             "qwen3_vl_moe": (T.Qwen3VLMoeConfig, T.Qwen3VLMoeForConditionalGeneration),
                             "qwen3_5_moe": (T.Qwen3_5MoeConfig, T.Qwen3_5MoeForConditionalGeneration)}[family]
    tied = family in FAMILY_TEXT
    text = dict(FAMILY_TEXT.get(family, TEXT), model_type=f"{family}_text", vocab_size=len(tok),
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                tie_word_embeddings=tied)
    config = config_cls(text_config=text, vision_config=VISION[family.removesuffix("_moe")],
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return model_cls(config)


def image_processor(family: str = "qwen2_vl"):
    """Qwen2VLImageProcessor (PIL) with 4 .. 16 tokens per image (Qwen3-VL uses the same class, 16-pixel patches)."""
    scale = (PATCH[family] / 14) ** 2
    return T.Qwen2VLImageProcessorPil(size={"shortest_edge": round(MIN_PIXELS * scale),
                                            "longest_edge": round(MAX_PIXELS * scale)}, patch_size=PATCH[family])


def build(out: str, family: str = "qwen2_vl", seed: int = 0) -> str:
    """Write a tiny random checkpoint of ``family`` (as ``model``) to ``out``; returns ``out``."""
    tok = tokenizer(family)
    model(family, seed, tok).save_pretrained(out)
    if family == "qwen3_vl_moe":  # the experts as the released checkpoints store them
        released_layout(os.path.join(out, "model.safetensors"))
    tok.save_pretrained(out)
    image_processor(family).save_pretrained(out)
    return out


def released_layout(path: str) -> None:
    """Rewrite a Qwen3-VL MoE checkpoint's experts as the released checkpoints store them (gate_up_proj experts x
    hidden x 2 inter, down_proj experts x inter x hidden): transformers 5 keeps the transpose in memory and its
    save_pretrained writes that, which transformers cannot load under ZeRO-3 (families/qwen3_vl_moe.py)."""
    from safetensors.torch import load_file, save_file
    state = load_file(path)
    save_file({k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
               for k, v in state.items()}, path, metadata={"format": "pt"})


SIZES = [(60, 40), (100, 50), (30, 90), (120, 120), (56, 56), (200, 70)]
COLORS = ["red", "green", "blue", "yellow"]


def write_data(folder: str, n: int = 16, text_every: int = 0) -> str:
    """``n`` LLaVA-format samples over images of SIZES (every ``text_every``-th sample text-only); returns the file."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    samples = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        if text_every and i % text_every == text_every - 1:
            conv = [{"from": "human", "value": "Describe red"}, {"from": "gpt", "value": "red"}]
            samples.append({"id": f"t{i}", "conversations": conv})
            continue
        name = f"images/{i:03d}.png"
        Image.new("RGB", SIZES[i % len(SIZES)], color).save(os.path.join(folder, name))
        conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": color}]
        samples.append({"id": f"i{i}", "image": name, "conversations": conv})
    path = os.path.join(folder, "data.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path
