"""A tiny random InternVL checkpoint in the real layout, written by transformers' own classes.

config.json (InternVLConfig: a 2-layer InternViT of 32x32 tiles in 8x8 patches, 4 tokens per tile after the pixel
shuffle, a 4-layer Qwen2 LLM, untied), model.safetensors, a tokenizer with InternVL's image tokens (``<img>``,
``</img>``, ``<IMG_CONTEXT>``, ``<video>``) and a ChatML template that writes ``<IMG_CONTEXT>`` for an image part (as
the -hf checkpoints' template), and GotOcr2ImageProcessor (PIL) with ``crop_to_patches`` off in its file, as the
released preprocessor_config.json has it (InternVLProcessor turns it on per call), up to 4 tiles.
"""
import torch
import transformers as T

from helpers.qwen import WORDS
from helpers.word_tokenizer import SPECIAL, word_tokenizer

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")
IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
TILE, PATCH = 32, 8
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // 4
TEXT = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=[TILE, TILE],
              patch_size=[PATCH, PATCH])


def tokenizer():
    tok = word_tokenizer(WORDS, bos=None, eos="<|im_end|>", chat_template=TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[4:] + IMAGE_TOKENS})
    return tok


def model(seed: int = 0, tok=None):
    tok = tok or tokenizer()
    config = T.InternVLConfig(
        text_config=dict(TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None),
        vision_config=VISION, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return T.InternVLForConditionalGeneration(config)


def image_processor():
    return T.GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=False, min_patches=1,
                                      max_patches=4)


def build(out: str, seed: int = 0) -> str:
    """Write a tiny random InternVL checkpoint to ``out``; returns ``out``."""
    tok = tokenizer()
    model(seed, tok).save_pretrained(out)
    tok.save_pretrained(out)
    image_processor().save_pretrained(out)
    return out
