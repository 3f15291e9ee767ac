"""A tiny random Gemma 3 checkpoint in the real layout, written by transformers' own classes.

config.json (Gemma3Config: a 4-layer Gemma 3 LLM with sliding-window and global layers, tied embeddings, a 2-layer
SigLIP tower of 32x32 pixels in 8x8 patches, 4 soft tokens per image, the boi / eoi / soft token ids of the
tokenizer), model.safetensors, a GemmaTokenizer (BPE with Gemma's normaliser and byte fallback, trained here on a
small corpus, with Gemma 3's special tokens and its chat template) and Gemma3Processor with the PIL image processor.
"""
import json

import torch
import transformers as T
from tokenizers import Tokenizer, models, normalizers, trainers

# Gemma 3's chat template (google/gemma-3-4b-it tokenizer_config.json), written out: a system message goes in front
# of the first user turn, "model" is the assistant's role, string content is trimmed, an image part is
# <start_of_image> (the processor expands it).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
MM_TOKENS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# Each string is its own training sequence, so no merge spans a role name, a newline and a reply.
CORPUS = ["user", "model", "What color is the shape?", "red green blue yellow", "Which shape is it? a square circle",
          "triangle. Describe the image.", "\n\n\n\n\n"]
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
            max_position_embeddings=512, tie_word_embeddings=True)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, vision_use_head=False)  # as the released models: no pooling head on the tower
TOKENS_PER_IMAGE = 4  # 4x4 patches average-pooled 2x2


def tokenizer():
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")  # as GemmaTokenizer: no pre-tokenizer, spaces as ▁
    bpe.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=100, special_tokens=SPECIAL,
                                                             show_progress=False))
    learnt = json.loads(bpe.to_str())["model"]
    tok = T.GemmaTokenizer(vocab=learnt["vocab"], merges=[tuple(m) for m in learnt["merges"]],
                           extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                 "image_token": "<image_soft_token>"})
    tok.add_special_tokens({"additional_special_tokens": MM_TOKENS})
    tok.chat_template = GEMMA3_TEMPLATE
    return tok


def model(seed: int = 0, tok=None):
    tok = tok or tokenizer()
    ids = tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    config = T.Gemma3Config(text_config=dict(TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                            vision_config=dict(VISION, model_type="siglip_vision_model"),
                            mm_tokens_per_image=TOKENS_PER_IMAGE, boi_token_index=ids[0], eoi_token_index=ids[1],
                            image_token_index=ids[2], tie_word_embeddings=True)
    torch.manual_seed(seed)
    return T.Gemma3ForConditionalGeneration(config)


def processor(tok=None):
    image_processor = T.Gemma3ImageProcessorPil(size={"height": VISION["image_size"], "width": VISION["image_size"]})
    return T.Gemma3Processor(image_processor, tok or tokenizer(), chat_template=GEMMA3_TEMPLATE,
                             image_seq_length=TOKENS_PER_IMAGE)


def build(out: str, seed: int = 0) -> str:
    """Write a tiny random Gemma 3 checkpoint to ``out``; returns ``out``."""
    tok = tokenizer()
    model(seed, tok).save_pretrained(out)
    processor(tok).save_pretrained(out)
    return out
