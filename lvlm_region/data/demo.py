"""The embedded default: generated shape images, LLaVA-format captions and Q/A, a sentencepiece
tokenizer trained on that corpus, and a tiny randomly initialised LLaVA model saved as a checkpoint.

Layout of the directory it writes (all of it deterministic for a given seed)::

    images/*.png            48x48 RGB, one coloured shape in one quadrant
    pretrain.json           stage 1: caption per image ("a red circle at the top left")
    sft_train.json          stage 2: the three questions per image (color / shape / position), random order
    sft_eval.json           held-out images, one question each, with its category (color / shape / position)
    text_eval.json          the same held-out scenes and questions without an image: the scene written in the
                            scene tokens the LLM's text pretraining read (the text-retention set)
    base_model/             LlavaForConditionalGeneration + tokenizer + processor (save_pretrained)
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile

import sentencepiece as spm
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlamaTokenizer, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

from ..config import TEXT_EVAL
from ..infra import outputs
from ..model.families.llava import class_tokens, image_seq_length
from ..model.loss import token_loss_sum, valid_tokens
from .formats import normalize
from .templates import BUILTIN, VICUNA_SYSTEM, resolve

log = logging.getLogger(__name__)

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20),
          "purple": (140, 40, 180), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {"color": "What color is the shape?", "shape": "Which shape is in the image?",
             "position": "Where is the shape?"}
IMAGE_SIZE = 32  # with 16-pixel patches: one image token per quadrant
DONE_MARKER = "COMPLETE-7"  # bumped when the demo's contents change, so an older directory is rebuilt
# Every marker the demo has written: a directory with one of them is the demo's own (outputs.check_replaceable).
MARKERS = ("COMPLETE", "COMPLETE-2", "COMPLETE-3", "COMPLETE-4", "COMPLETE-5", "COMPLETE-6", DONE_MARKER)


def chance_accuracy() -> float:
    """Accuracy of guessing uniformly per question type, the eval set asks each type equally often."""
    return (1 / len(COLORS) + 1 / len(SHAPES) + 1 / len(POSITIONS)) / 3


def draw(color: str, shape: str, position: str, rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    d = ImageDraw.Draw(im)
    half = IMAGE_SIZE // 2
    size = rng.randint(10, 14)
    x0 = (half if "right" in position else 0) + rng.randint(1, half - size - 1)
    y0 = (half if "bottom" in position else 0) + rng.randint(1, half - size - 1)
    box, fill = (x0, y0, x0 + size, y0 + size), COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    else:
        t = size // 3
        d.rectangle((x0 + t, y0, x0 + 2 * t, y0 + size), fill=fill)
        d.rectangle((x0, y0 + t, x0 + size, y0 + 2 * t), fill=fill)
    return im


def _qa(kind: str, attrs: dict, first: bool) -> list[dict]:
    q = QUESTIONS[kind]
    return [{"from": "human", "value": f"<image>\n{q}" if first else q}, {"from": "gpt", "value": attrs[kind]}]


def caption_of(attrs: dict) -> str:
    return f"a {attrs['color']} {attrs['shape']} at the {attrs['position']}"


def generate(out_dir: str, n_train: int = 2400, n_eval: int = 240, seed: int = 0) -> None:
    """Write images and the three JSON files. Eval images are drawn separately from training images."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    pretrain, train, evals, texts = [], [], [], []
    kinds = list(QUESTIONS)
    for i in tqdm(range(n_train + n_eval), desc="demo 1/3: drawing images", mininterval=2):
        attrs = {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "position": rng.choice(POSITIONS)}
        name = f"images/{i:05d}.png"
        draw(attrs["color"], attrs["shape"], attrs["position"], rng).save(os.path.join(out_dir, name))
        if i < n_train:
            caption = caption_of(attrs)
            pretrain.append({"id": f"cap{i}", "image": name,
                             "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                               {"from": "gpt", "value": caption}]})
            asked = rng.sample(kinds, len(kinds))  # every question, in random order
            conv = [t for j, k in enumerate(asked) for t in _qa(k, attrs, j == 0)]
            train.append({"id": f"sft{i}", "image": name, "conversations": conv})
        else:
            k = kinds[i % len(kinds)]
            evals.append({"id": f"eval{i}", "category": k, "image": name, "conversations": _qa(k, attrs, True)})
            scene = "".join(scene_slots(caption_of(attrs)))  # the same held-out scene, written in scene tokens
            texts.append({"id": f"text{i}", "category": k, "conversations": [
                {"from": "human", "value": f"{scene}\n{QUESTIONS[k]}"}, {"from": "gpt", "value": attrs[k]}]})
    for fname, rows in (("pretrain.json", pretrain), ("sft_train.json", train), ("sft_eval.json", evals),
                        (TEXT_EVAL, texts)):
        with open(os.path.join(out_dir, fname), "w") as f:
            json.dump(rows, f, indent=1)


def train_tokenizer(out_dir: str, vocab_size: int = 512) -> str:  # 256 byte pieces, 256 learnt
    """Train a sentencepiece BPE model on the generated corpus; returns a transformers tokenizer dir."""
    log.info("demo 2/3: training its tokenizer")
    lines = [*QUESTIONS.values()]
    for fname in ("pretrain.json", "sft_train.json"):
        with open(os.path.join(out_dir, fname)) as f:
            rows = json.load(f)
        lines += [t["value"].replace("<image>\n", "") for s in rows for t in s["conversations"]]
    # Every stage-2 sample starts with the system prompt and has the role words: weighted as the model reads them,
    # so BPE learns them as words (the prompt is ~25 tokens, not 118 spelt out in characters).
    lines += [f"{VICUNA_SYSTEM} USER: ASSISTANT:"] * len(rows)
    tok_dir = os.path.join(out_dir, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            f.write("\n".join(lines))
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tok_dir, "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=["<image>", *slot_tokens()], hard_vocab_limit=False, minloglevel=2,
            byte_fallback=True)  # with its 256 byte pieces, no character outside the vocabulary is lost
    tok = LlamaTokenizer.from_pretrained(tok_dir)
    tok.pad_token = "<pad>"
    tok.chat_template = BUILTIN["vicuna_v1"]  # as a released chat model carries its format (--template auto)
    tok.save_pretrained(tok_dir)
    return tok_dir


def slot_tokens() -> list[str]:
    """One token per quadrant content: <empty> or <color_shape>; the base LLM reads scenes written in them."""
    return ["<empty>"] + [f"<{c}_{s}>" for c in COLORS for s in SHAPES]


def attrs_of(caption: str) -> dict:
    """{color, shape, position} of a caption of generate() (caption_of's inverse)."""
    _, color, shape, _, _, *pos = caption.split()
    return {"color": color, "shape": shape, "position": " ".join(pos)}


def scene_slots(caption: str) -> list[str]:
    """The four quadrant tokens (row-major, as the vision tower's patches) for a caption of generate()."""
    a = attrs_of(caption)
    return [f"<{a['color']}_{a['shape']}>" if q == a["position"] else "<empty>" for q in POSITIONS]


def pretrain_language(model, tok, out_dir: str, seed: int, steps: int = 1500, batch: int = 32) -> float:
    """Make the tiny LLM a base LLM for the demo: it learns the corpus's language, and to caption and answer
    from a *symbolic* scene (four quadrant tokens, see slot_tokens) placed where the four image tokens go.

    A purely random LLM cannot express confident answers through its frozen random norm and LM head (its
    logits stay within a few nats of uniform), and a tiny one that never read a scene gives a projector
    nothing to align to within a CPU budget. After this step stage 1 has the job it has with a real LLM:
    map image features to inputs the LLM already understands. The LLM itself has seen no image.
    Plain torch on one process; returns the last loss.
    """
    n_image = image_seq_length(model.config)
    if n_image != len(POSITIONS):
        raise ValueError(f"the demo scene has {len(POSITIONS)} quadrant tokens but the model gives {n_image} "
                         "image tokens per image; keep image_size / patch_size at 2")
    with open(os.path.join(out_dir, "pretrain.json")) as f:
        captions = {s["image"]: s["conversations"][-1]["value"] for s in json.load(f)}
    image_id = tok.convert_tokens_to_ids("<image>")
    rng = random.Random(seed)
    rows = []
    # As the two stages will render and tokenize them: stage 1's plain template (LLaVA's rule: the caption tokenized
    # on its own after the image) and stage 2's default, the tokenizer's own template (vicuna_v1's text, one string).
    fmts = {name: resolve(name, tok, "the demo tokenizer") for name in ("plain", "auto")}
    # Each training scene twice: its caption (plain), and all three questions in a random order (auto).
    for image, caption in captions.items():
        attrs = attrs_of(caption)
        asked = rng.sample(list(QUESTIONS), len(QUESTIONS))
        chat = {"image": image, "conversations": [t for j, k in enumerate(asked) for t in _qa(k, attrs, j == 0)]}
        plain = {"image": image, "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                   {"from": "gpt", "value": caption}]}
        for template, s in (("plain", plain), ("auto", chat)):
            sample = normalize(json.dumps(s))
            fmt = fmts[template]
            row = fmt.tokenize(tok, fmt.segments(tok, sample["messages"]), [[image_id] * n_image])
            slots = iter(tok.convert_tokens_to_ids(scene_slots(caption)))
            row["input_ids"] = [next(slots) if i == image_id else i for i in row["input_ids"]]
            rows.append(row)
    lm = model.get_decoder()
    params = list(lm.parameters()) + list(model.get_output_embeddings().parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    warmup = steps // 20  # linear warmup, then cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(warmup, 1)) * 0.5 * (
        1 + math.cos(math.pi * min(k, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    loss = float("nan")
    for step in tqdm(range(steps), desc="demo 3/3: pretraining the tiny LLM on text", mininterval=2):
        picked = [rows[i] for i in torch.randint(len(rows), (batch,), generator=gen).tolist()]
        T = max(len(r["input_ids"]) for r in picked)
        ids = torch.full((batch, T), tok.pad_token_id)
        labels = torch.full((batch, T), -100)
        for j, r in enumerate(picked):
            ids[j, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[j, :len(r["labels"])] = torch.tensor(r["labels"])
        mask = (labels != -100) | (ids != tok.pad_token_id)
        logits = model.lm_head(lm(input_ids=ids, attention_mask=mask).last_hidden_state)
        lsum = token_loss_sum(logits, labels) / valid_tokens(labels)
        opt.zero_grad()
        lsum.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss = float(lsum.detach())
        if (step + 1) % 100 == 0:
            log.debug("tiny LLM language pretraining: step %d, loss %.4f", step + 1, loss)
    log.info("tiny LLM language pretraining: %d steps, final loss %.3f", steps, loss)
    return loss


def demo_config(vocab_size: int, image_token_id: int, pad_token_id: int) -> LlavaConfig:
    """The embedded default: an 8-layer Llama LLM, a 2-layer CLIP tower, an mlp2x_gelu projector."""
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=16, projection_dim=64)
    # Penultimate-layer patch features without CLS ("default"), as LLaVA-1.5 does.
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=(32 // 16) ** 2,
                       pad_token_id=pad_token_id)


def planned_config() -> LlavaConfig:
    """The demo model's architecture (depth, tying) before anything is generated: what a region spec is checked
    against before minutes of generation. Vocabulary and token ids are the tokenizer's, known only once it exists."""
    return demo_config(512, 0, 0)


def build_demo_model(vocab_size: int, image_token_id: int, pad_token_id: int,
                     seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(demo_config(vocab_size, image_token_id, pad_token_id))


def make_image_processor(size: int):
    """CLIP preprocessing at ``size``; the PIL backend, since torchvision (the default backend) has no CPU
    build here and is optional on GPU nodes."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # older transformers: the PIL implementation is the default class
        from transformers import CLIPImageProcessor as cls
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_base_model(out_dir: str, tok_dir: str, seed: int) -> str:
    """Randomly initialise the tiny LLaVA and save it with tokenizer and processor, like a real checkpoint."""
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = build_demo_model(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, seed)
    pretrain_language(model, tok, out_dir, seed)
    path = os.path.join(out_dir, "base_model")
    model.save_pretrained(path)
    cfg = model.config
    processor = LlavaProcessor(image_processor=make_image_processor(cfg.vision_config.image_size), tokenizer=tok,
                               patch_size=cfg.vision_config.patch_size, image_token="<image>",
                               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                               num_additional_image_tokens=class_tokens(cfg.vision_config),
                               chat_template=tok.chat_template)
    processor.save_pretrained(path)
    return path


def ensure(out_dir: str, seed: int = 0) -> str:
    """Create the demo directory unless a complete one exists; returns it. Written to a temporary
    directory and renamed, so an interrupted run never leaves a half-written default behind."""
    if os.path.isfile(os.path.join(out_dir, DONE_MARKER)):
        return out_dir
    outputs.check_replaceable(out_dir, MARKERS, "demo directory", "the demo directory")  # before 5 minutes of work
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    log.info("generating the embedded demo data and tiny model in %s", out_dir)
    generate(tmp, seed=seed)
    build_base_model(tmp, train_tokenizer(tmp), seed)
    open(os.path.join(tmp, DONE_MARKER), "w").close()
    outputs.replace_dir(tmp, out_dir, MARKERS, "demo directory", "the demo directory")
    return out_dir
