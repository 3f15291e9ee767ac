"""Tiny random checkpoints in the real formats of the parts users bring: causal LMs with a real tokenizer
file, CLIP (full dual-encoder checkpoint, as openai/clip-vit-large-patch14-336 ships) and SigLIP vision models
with their image processors. Built from configs; nothing is downloaded."""
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel)

WORDS = ("<unk> <s> </s> a red blue green circle square triangle in the top bottom left right what is USER: "
         "ASSISTANT:").split()
LLMS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer.json with <unk>/<s>/</s>, no pad and no image token (as base LLMs ship)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def llm(path: Path, family: str, chat_template: str | None = None, seed: int = 0) -> Path:
    cfg_cls, model_cls = LLMS[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=None,  # Phi3Config defaults to 32000, outside this vocabulary
                  tie_word_embeddings=family == "qwen2")  # Qwen2-0.5B ties its embeddings
    model_cls(cfg).save_pretrained(path)
    tokenizer(chat_template).save_pretrained(path)
    return path


def clip(path: Path, seed: int = 0) -> Path:
    """A full CLIPModel checkpoint (text + vision), image 32, patch 16 -> 4 patches + CLS."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 50},
                     vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 16}, projection_dim=16)
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def siglip(path: Path, seed: int = 0) -> Path:
    """A SigLIP vision-only checkpoint (model_type siglip_vision_model), image 32, patch 16 -> 4 patches."""
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                             image_size=32, patch_size=16)
    SiglipVisionModel(cfg).save_pretrained(path)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
