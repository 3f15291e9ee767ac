"""What the per-family tests (test_gemma3, test_qwen3_vl, test_internvl) share: samples with no, one and two images
of several sizes, single- and multi-turn; the prepared dataset a checkpoint's family makes of them; and the summed
token loss of a collated batch."""
import json
import os

import pytest
import torch
from PIL import Image

from lvlm_region.data import prepare
from lvlm_region.data.batches import ImageTextDataset, collate
from lvlm_region.data.images import ImageLoader
from lvlm_region.model.loss import token_loss_sum

COLORS = ["red", "green", "blue", "yellow"]


def write(folder, sizes, second_reply: str = "square", n: int = 10) -> tuple[str, str]:
    """``n`` samples: sample i has i % 3 images (sizes cycling through ``sizes``) in its first user turn, odd samples a
    second turn answered ``second_reply``. Returns (data file, image folder)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    samples = []
    for i in range(n):
        names = []
        for k in range(i % 3):
            names.append(f"images/{i}_{k}.png")
            Image.new("RGB", sizes[(i + k) % len(sizes)], ["red", "blue"][k]).save(os.path.join(folder, names[-1]))
        conv = [{"from": "human", "value": "<image>\n" * len(names) + "What color is the shape?"},
                {"from": "gpt", "value": COLORS[i % 4]}]
        if i % 2:
            conv += [{"from": "human", "value": "Which shape is it?"}, {"from": "gpt", "value": second_reply}]
        sample = {"id": f"s{i}", "conversations": conv}
        if names:
            sample["image"] = names if len(names) > 1 else names[0]
        samples.append(sample)
    path = os.path.join(folder, "data.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path, str(folder)


def assert_ids_as_the_processor_builds(ds, data, tok, placeholder: str, expand, end_of_turn: str) -> None:
    """Each prepared row's ids are what a processor's ``__call__`` builds for its sample: the chat template's text
    (each ``<image>`` written as ``placeholder``, the template's last newline dropped: it never trains), each
    placeholder replaced by ``expand(image)`` (the processor's ``replace_image_token`` for the decoded image), then
    the tokenizer; only the replies and their ``end_of_turn`` train (one token each with these tokenizers)."""
    path, folder = data
    with open(path) as f:
        samples = json.load(f)
    assert len(ds) == len(samples)
    for row, sample in zip(ds, samples):
        names = sample.get("image") or []
        names = [names] if isinstance(names, str) else names
        messages = [{"role": "user" if t["from"] == "human" else "assistant",
                     "content": t["value"].replace("<image>", placeholder)} for t in sample["conversations"]]
        text = tok.apply_chat_template(messages, tokenize=False)
        assert text.endswith(end_of_turn + "\n")
        pieces = text[:-1].split(placeholder)
        assert len(pieces) == len(names) + 1
        images = [Image.open(os.path.join(folder, n)).convert("RGB") for n in names]
        text = pieces[0] + "".join(expand(image) + piece for image, piece in zip(images, pieces[1:]))
        assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"], sample["id"]
        replies = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        assert tok.convert_ids_to_tokens(trained) == [x for r in replies for x in (r, end_of_turn)]


def items(ckpt: str, data: tuple[str, str]):
    """(layout, tokenizer, dataset) of the prepared ``data`` for ``ckpt``, images loaded by its image processor."""
    path, folder = data
    enc, tok, processor = prepare.for_model(ckpt, "auto", 512)
    ds = prepare.prepare(path, folder, enc, tok, os.path.join(folder, "prepared"))
    load = ImageLoader(processor.image_processor, "square", enc.layout.tensor_keys)
    return enc.layout, tok, ImageTextDataset(ds, folder, load, enc.layout)


def loss_of(model, layout, tok):
    """samples, dummy -> the summed token loss of their collated (right-padded) batch under ``model``."""
    def loss(samples, dummy=None):
        b = collate(samples, tok.pad_token_id, dummy=dummy)
        with torch.no_grad():
            return float(token_loss_sum(model(**layout.model_inputs(b)).logits, b["labels"]))
    return loss



def assert_packing_matches_padding(model, layout, tok, samples) -> None:
    """Packed into one row (positions restarting per sample, no mask, no KV cache, as the trainer runs it), the
    samples give the summed loss of their right-padded batch."""
    from lvlm_region.data.batches import collate_packed
    assert all(int(s["labels"][0]) == -100 for s in samples)  # packing ignores each first label; so does the data
    padded, packed = collate(samples, tok.pad_token_id), collate_packed(samples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        a = float(token_loss_sum(model(**layout.model_inputs(padded), use_cache=False).logits, padded["labels"]))
        b = float(token_loss_sum(model(**layout.model_inputs(packed), use_cache=False).logits, packed["labels"]))
    assert b == pytest.approx(a, rel=1e-5)


@torch.no_grad()
def check_importance_and_pruning(ckpt: str, data: tuple[str, str], tmp) -> dict:
    """launch/importance.py scores the 4 layers over the data (images and text); pruning the lowest-scoring one
    (--protect none) writes a 3-layer model that plain transformers loads and that generates the same with and
    without its KV cache. Returns prune.json."""
    import subprocess
    import sys

    from transformers import AutoConfig, AutoModelForImageTextToText

    from lvlm_region.tools import prune
    path, folder = data
    scores = os.path.join(tmp, "scores.json")
    res = subprocess.run([sys.executable, "launch/importance.py", "--model", ckpt, "--data", path, "--image-folder",
                          folder, "--samples", "8", "--output", scores], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with open(scores) as f:
        bi = json.load(f)
    assert (bi["method"], bi["layers"], bi["samples"]) == ("bi", 4, 8)
    out = os.path.join(tmp, "pruned")
    prune.run(ckpt, scores, [1], "none", out)
    with open(os.path.join(out, prune.PRUNE_FILE)) as f:
        record = json.load(f)
    assert record["dropped"] == [min(range(4), key=lambda i: (bi["scores"][i], i))]
    assert AutoConfig.from_pretrained(out).get_text_config().num_hidden_layers == 3
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    ids = torch.randint(16, 30, (1, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=model.config.get_text_config().pad_token_id)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw, use_cache=False))
    return record
