"""Stage 1 from separate parts: a causal-LM checkpoint and a CLIP / SigLIP vision checkpoint -> one Llava model.

The result is a transformers-format LlavaForConditionalGeneration directory with its processor
(``AutoModelForImageTextToText.from_pretrained`` loads it and can generate): the LLM's decoder and LM head and the
vision checkpoint's encoder are the loaded modules themselves (placed into Llava's own attributes, no weight
renaming), the projector is freshly initialised, the tokenizer gains ``<image>`` (and a pad token if it has
none) with the embeddings resized, and the run's chat template written in when it names a built-in one
(``templates.BUILTIN``; otherwise the LLM's own is kept). Vision features: the penultimate layer's patch tokens;
CLIP drops its class token ("default"), SigLIP has none ("full"). Image size, normalisation and processor come from
the vision checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionModel)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..infra import outputs
from .families.llava import class_tokens, image_seq_length

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PROJECTORS = ("mlp2x_gelu",)  # transformers' LlavaMultiModalProjector: Linear, GELU, Linear
VISION_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}  # full model -> its vision part
TOWERS = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}
DONE = "ASSEMBLED"  # marker written last: the directory is complete
def _config(flag: str, path: str):
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{flag} {path}: no config.json there; give a local transformers checkpoint directory")
    return AutoConfig.from_pretrained(path)


def _vision_config(vision: str):
    found = _config("--vision", vision)
    vision_cfg = getattr(found, "vision_config", None) if found.model_type in VISION_TYPES else found
    if vision_cfg is None or vision_cfg.model_type not in VISION_TYPES.values():
        raise ValueError(f"--vision {vision}: config.json has model_type {found.model_type!r}, not a CLIP or SigLIP "
                         "vision model; give e.g. a local copy of openai/clip-vit-large-patch14-336 or "
                         "google/siglip-so400m-patch14-384")
    return vision_cfg


def planned_config(llm: str, vision: str, projector: str) -> LlavaConfig:
    """The LlavaConfig ``assemble`` builds, from the parts' config.json alone (a dry run): the image token id is
    the first after the LLM's vocabulary, where adding it to the tokenizer puts it."""
    if projector not in PROJECTORS:
        raise ValueError(f"--projector {projector!r}: only {', '.join(PROJECTORS)} is supported")
    vision_cfg, llm_cfg = _vision_config(vision), _config("--llm", llm)
    config = LlavaConfig(vision_config=vision_cfg.to_dict(), text_config=llm_cfg.to_dict(),
                         image_token_id=llm_cfg.vocab_size, projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default" if class_tokens(vision_cfg) else "full",
                         tie_word_embeddings=bool(getattr(llm_cfg, "tie_word_embeddings", False)))
    config.image_seq_length = image_seq_length(config)
    return config


def check(llm: str, vision: str, projector: str) -> tuple:
    """Validate the parts from their config files alone (no weights); returns (LLM config, vision config)."""
    if projector not in PROJECTORS:
        raise ValueError(f"--projector {projector!r}: only {', '.join(PROJECTORS)} is supported (transformers' "
                         "LlavaMultiModalProjector)")
    vision_cfg = _vision_config(vision)
    if not os.path.isfile(os.path.join(vision, "preprocessor_config.json")):
        raise FileNotFoundError(f"--vision {vision}: no preprocessor_config.json; the image size and normalisation "
                                "come from it (copy it from the vision model's original repository)")
    llm_cfg = _config("--llm", llm)
    if llm_cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"--llm {llm}: config.json has model_type {llm_cfg.model_type!r}, which is not a causal LM "
                         "transformers knows; give a Llama / Vicuna / Mistral / Phi-3 / Qwen2 checkpoint directory")
    if not any(os.path.isfile(os.path.join(llm, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                               "tokenizer_config.json")):
        raise FileNotFoundError(f"--llm {llm}: no tokenizer files (tokenizer.json / tokenizer.model); the LLM's "
                                "tokenizer is needed to add the image token")
    return llm_cfg, vision_cfg


def assemble(llm: str, vision: str, projector: str, out: str, seed: int = 0, chat_template: str | None = None) -> str:
    """Build and save the Llava model, tokenizer and processor into ``out`` (rank 0 only); returns ``out``.

    ``chat_template`` (the run's built-in template), when given, replaces the LLM tokenizer's own.

    Written to a temporary directory and renamed, with a marker file last, so a crash leaves nothing half-built.
    """
    llm_cfg, vision_cfg = check(llm, vision, projector)
    outputs.check_replaceable(out, DONE, "assembled model", "OUTPUT_DIR/base_model")
    strategy = "default" if class_tokens(vision_cfg) else "full"  # "default" drops the class token
    tok = AutoTokenizer.from_pretrained(llm)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:  # LLaVA pads Vicuna with unk; Llama-3 has no unk: a new pad token
        if tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    if chat_template is not None:
        tok.chat_template = chat_template
    config = LlavaConfig(vision_config=vision_cfg.to_dict(), text_config=llm_cfg.to_dict(),
                         image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy=strategy,
                         tie_word_embeddings=bool(getattr(llm_cfg, "tie_word_embeddings", False)),
                         pad_token_id=tok.pad_token_id)
    config.image_seq_length = n = image_seq_length(config)

    causal_lm = AutoModelForCausalLM.from_pretrained(llm, dtype="auto")
    # The class Llava builds for this vision config (CLIPVisionModel / SiglipVisionModel); from a full CLIP or
    # SigLIP checkpoint it loads the vision half.
    tower = TOWERS[vision_cfg.model_type].from_pretrained(vision, dtype=causal_lm.dtype)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.set_decoder(causal_lm.get_decoder())  # the loaded modules themselves, no key renaming
    model.set_output_embeddings(causal_lm.get_output_embeddings())
    model.model.vision_tower = tower  # Llava's own attribute (model.LAYOUTS)
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config).to(causal_lm.dtype)
    model.resize_token_embeddings(len(tok))  # new rows (image, pad) start at the mean embedding
    if config.tie_word_embeddings:
        model.tie_weights()
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"assembly left tensors without data: {meta[:5]}")
    processor = LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(vision), tokenizer=tok,
                               patch_size=vision_cfg.patch_size, vision_feature_select_strategy=strategy,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=class_tokens(vision_cfg),
                               chat_template=tok.chat_template)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".assemble-", dir=parent)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, DONE), "w") as f:
        json.dump(sources(llm, vision, projector, seed, chat_template), f)
    outputs.replace_dir(tmp, out, DONE, "assembled model", "OUTPUT_DIR/base_model")
    log.info("assembled %s + %s (%s, %s features, %d image tokens) into %s", llm, vision, projector, strategy, n, out)
    return out


def sources(llm: str, vision: str, projector: str, seed: int, chat_template: str | None = None) -> dict:
    """What an assembled directory was built from (its marker file), so changed parts are never reused."""
    return {"llm": os.path.abspath(llm), "vision": os.path.abspath(vision), "projector": projector, "seed": seed,
            "chat_template": chat_template}


def is_assembled(out: str, llm: str, vision: str, projector: str, seed: int, chat_template: str | None = None) -> bool:
    """Whether ``out`` is a complete assembly of exactly these parts (a rerun or resume reuses it)."""
    marker = os.path.join(out, DONE)
    if not os.path.isfile(marker):
        return False
    with open(marker) as f:
        return json.load(f) == sources(llm, vision, projector, seed, chat_template)
