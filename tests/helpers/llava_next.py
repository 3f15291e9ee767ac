"""A tiny random LLaVA-NeXT checkpoint in the real layout, written by transformers' own classes.

config.json (LlavaNextConfig: a 4-layer Llama LLM, a 2-layer CLIP tower of 28x28 tiles in 14x14 patches with its class
token, the default feature strategy and layer -2, image_grid_pinpoints of 1x2, 2x1 and 2x2 tiles), model.safetensors,
a word-level tokenizer with ``<image>`` and a ChatML template, and LlavaNextProcessor with the PIL image processor.
"""
import torch
import transformers as T

from helpers.qwen import QWEN_TEMPLATE, WORDS
from helpers.word_tokenizer import SPECIAL, word_tokenizer

TILE, PATCH = 28, 14
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
TEMPLATE = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
TEXT = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=TILE, patch_size=PATCH)


def tokenizer():
    tok = word_tokenizer(WORDS, bos=None, eos="<|im_end|>", chat_template=TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})  # <image> among them
    return tok


def model(seed: int = 0, tok=None):
    tok = tok or tokenizer()
    config = T.LlavaNextConfig(
        text_config=dict(TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None),
        vision_config=VISION, image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(seed)
    return T.LlavaNextForConditionalGeneration(config)


def processor(tok=None):
    image_processor = T.LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE,
                                                                                            "width": TILE},
                                                   image_grid_pinpoints=PINPOINTS)
    return T.LlavaNextProcessor(image_processor, tok or tokenizer(), patch_size=PATCH,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=TEMPLATE)


def build(out: str, seed: int = 0) -> str:
    """Write a tiny random LLaVA-NeXT checkpoint to ``out``; returns ``out``."""
    tok = tokenizer()
    model(seed, tok).save_pretrained(out)
    processor(tok).save_pretrained(out)
    return out
