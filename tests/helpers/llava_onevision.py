"""A tiny random LLaVA-OneVision checkpoint in the real layout, written by transformers' own classes.

config.json (LlavaOnevisionConfig: a 4-layer Qwen2 LLM, a 2-layer SigLIP tower without its head of 28x28 tiles in 14x14
patches, the "full" feature strategy and layer -1, as the llava-hf checkpoints; image_grid_pinpoints of 1x2, 2x1 and 2x2
tiles; ``anyres_max_2`` so that a 2x2-tile image's features are interpolated down, as ``anyres_max_9`` does to large
images of the real ones), model.safetensors, a word-level tokenizer with ``<image>`` and a ChatML template, the PIL
image processor, and processor_config.json as LlavaOnevisionProcessor writes it (the class cannot be constructed here:
it needs torchvision for its video processor).
"""
import json
import os

import torch
import transformers as T

from helpers.llava_next import PATCH, PINPOINTS, TILE, tokenizer
from lvlm_region.model.families import llava_onevision

TEXT = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=TILE, patch_size=PATCH, vision_use_head=False)
# Image sizes for family_data.write: samples 1 and 7 have one 100x100 image (2x2 tiles, interpolated), samples 2, 5
# and 8 two images (one tile each), samples 0, 3, 6 and 9 none.
SIZES = [(28, 28), (100, 100), (40, 90), (60, 40), (200, 30), (20, 20)]
SETTINGS = {"num_image_tokens": (TILE // PATCH) ** 2, "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_2"}


def model(seed: int = 0, tok=None):
    tok = tok or tokenizer()
    config = T.LlavaOnevisionConfig(
        text_config=dict(TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None),
        vision_config=VISION, image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return T.LlavaOnevisionForConditionalGeneration(config)


def image_processor():
    return T.LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)


def processor():
    """LlavaOnevisionProcessor's counting and image methods (``replace_image_token``, ``_process_images``) on an
    instance without its ``__init__`` (families/llava_onevision.counter)."""
    return llava_onevision.counter(image_processor(), SETTINGS)


def build(out: str, seed: int = 0) -> str:
    """Write a tiny random LLaVA-OneVision checkpoint to ``out``; returns ``out``."""
    tok = tokenizer()
    model(seed, tok).save_pretrained(out)
    tok.save_pretrained(out)
    image_processor().save_pretrained(out)
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump({"image_token": "<image>", "processor_class": "LlavaOnevisionProcessor", "video_token": "<video>",
                   **SETTINGS}, f, indent=2)
    return out
