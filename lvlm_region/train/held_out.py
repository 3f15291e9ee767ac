"""Held-out evaluation on the training engine: token loss and generated-answer accuracy.

Runs on every rank over its shard. Under ZeRO-3 every rank must make the same forward calls, so the
shards are padded to equal size and generation uses ``synced_gpus``.
"""
from __future__ import annotations

import json
import logging
import string

import torch

from ..data.batches import ImageTextDataset, run_loader, to_device
from ..data.prepare import image_token_ids
from ..data.templates import end_of_turn_id
from ..model.families import find_parts
from ..model.loss import loss_positions, token_loss_sum, valid_tokens
from . import engine

log = logging.getLogger(__name__)


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().strip(string.punctuation).split())


@torch.no_grad()
def evaluate(ds_engine, eval_ds, image_folder: str, s, cfg, dtype: torch.dtype, device: torch.device) -> dict:
    """Held-out loss and answer accuracy of the model ``ds_engine`` runs (a DeepSpeed engine, or the model itself:
    engine.inference_model), with up to 5 right and 5 wrong answers; ``s``: the run's run_setup.Setup."""
    model = getattr(ds_engine, "module", ds_engine)
    was_training = model.training
    model.eval()
    if cfg.eval_max_samples:
        eval_ds = eval_ds.select(range(min(cfg.eval_max_samples, len(eval_ds))))
    tokenizer = s.tokenizer
    pad_id = tokenizer.pad_token_id
    stop_ids = sorted({tokenizer.eos_token_id, end_of_turn_id(s.encoding.template, tokenizer)})
    load, layout = s.load_image, s.encoding.layout

    def loader(ds, left_pad=False):  # the same loader as training (with the dummy image for text-only batches)
        return run_loader(ds, cfg, pad_id, layout.dummy(), engine.rank(), engine.world_size(), shuffle=False,
                          drop_last=False, left_pad=left_pad)

    # Held-out loss over valid tokens (duplicates from shard padding are counted on both ranks; the
    # DistributedSampler pads at most world_size - 1 samples).
    loss_sum, n_valid = 0.0, 0
    for b in loader(ImageTextDataset(eval_ds, image_folder, load, layout)):
        b = to_device(b, device, dtype)
        logits = ds_engine(**layout.model_inputs(b), logits_to_keep=loss_positions(b["labels"])).logits
        loss_sum += float(token_loss_sum(logits, b["labels"]))
        n_valid += valid_tokens(b["labels"])
    loss_sum, n_valid = engine.all_reduce_sum([loss_sum, n_valid])

    # Greedy answers, compared after normalisation with the reference reply.
    prompts = PromptDataset(eval_ds, image_folder, load, s.encoding, tokenizer)
    results: list[dict] = []
    zero3 = engine.is_zero3(ds_engine)
    # generate() computes the image features by calling get_image_features itself, outside the inner model's
    # forward, so ZeRO-3 never gathers a parameter that lives on the inner model (LLaVA-NeXT's image_newline).
    extra = find_parts(model).projector_extra if zero3 else ()
    for b in loader(prompts, left_pad=True):
        meta = {k: b.pop(k) for k in ("index", "answer", "question", "id", "category")}
        b = to_device(b, device, dtype)
        with engine.gathered(extra, bool(extra)):  # per call: the inner model's forward partitions it again
            gen = model.generate(**layout.model_inputs(b), max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=stop_ids, synced_gpus=zero3)
        texts = tokenizer.batch_decode(gen[:, b["input_ids"].shape[1]:], skip_special_tokens=True)
        results += [{"index": i, "id": sid, "category": c, "question": q, "reference": a, "output": t,
                     "right": normalize(t) == normalize(a)}
                    for i, sid, c, q, a, t in zip(meta["index"], meta["id"], meta["category"], meta["question"],
                                                  meta["answer"], texts)]
    unique = {r["index"]: r for part in engine.all_gather_object(results) for r in part}  # no shard-padding twins
    rows = [unique[i] for i in sorted(unique)]
    correct = sum(r["right"] for r in rows)
    model.train(was_training)
    return {"loss": loss_sum / max(n_valid, 1.0), "accuracy": correct / len(rows), "correct": correct,
            "samples": len(rows), "by_category": by_category(rows),
            "right": [r for r in rows if r["right"]][:5], "wrong": [r for r in rows if not r["right"]][:5]}


def by_category(rows: list[dict]) -> dict:
    """{category: {"accuracy", "correct", "samples"}} over the rows that carry a category (sorted by name)."""
    out: dict = {}
    for r in rows:
        if r["category"]:
            c = out.setdefault(r["category"], {"correct": 0, "samples": 0})
            c["correct"] += r["right"]
            c["samples"] += 1
    return {k: {"accuracy": v["correct"] / v["samples"], **v} for k, v in sorted(out.items())}


class PromptDataset(ImageTextDataset):
    """Held-out samples cut before their last reply; yields prompt ids, image, reference answer and index."""

    def __init__(self, ds, image_folder, load_image, encoding, tokenizer):
        super().__init__(ds, image_folder, load_image, encoding.layout)
        self.encoding, self.tokenizer = encoding, tokenizer

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        ex = self.ds[(i + item["replaced"]) % len(self.ds)]  # the sample whose images were loaded
        messages = json.loads(ex["messages"])
        prompt = self.encoding.template.prompt(self.tokenizer, messages[:-1])
        image_ids = image_token_ids(ex["images"], self.image_folder, self.encoding.layout, decode=False,
                                    allow_outside=self.encoding.allow_outside_images)
        ids = self.encoding.template.tokenize(self.tokenizer, [(prompt, False)], image_ids,  # as training does
                                              self.encoding.layout.text_around)["input_ids"]
        item["input_ids"] = item["labels"] = torch.tensor(ids)
        item["answer"], item["index"], item["id"] = messages[-1]["content"], i, ex["id"]
        item["category"] = ex.get("category") or ""  # prepared before VERSION 3: no column
        item["question"] = messages[-2]["content"] if len(messages) > 1 else ""
        return item
