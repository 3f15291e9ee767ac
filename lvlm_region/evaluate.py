"""Held-out evaluation on the training engine: token loss and generated-answer accuracy.

Runs on every rank over its shard. Under ZeRO-3 every rank must make the same forward calls, so the
shards are padded to equal size and generation uses ``synced_gpus``.
"""
from __future__ import annotations

import json
import logging
import string

import torch

from . import engine
from .data import ImageTextDataset, run_loader, to_device
from .loss import loss_positions, token_loss_sum, valid_tokens
from .prepare import image_token_ids
from .templates import end_of_turn_id, tokenize

log = logging.getLogger(__name__)


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().strip(string.punctuation).split())


@torch.no_grad()
def evaluate(ds_engine, eval_ds, image_folder: str, s, cfg, dtype: torch.dtype, device: torch.device) -> dict:
    """Held-out loss and answer accuracy of ``ds_engine``'s model; ``s``: the run's trainer.Setup."""
    model = ds_engine.module
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
    results: list[tuple[int, bool, str]] = []
    zero3 = engine.is_zero3(ds_engine)
    for b in loader(prompts, left_pad=True):
        index, answers = b.pop("index"), b.pop("answer")
        b = to_device(b, device, dtype)
        gen = model.generate(**layout.model_inputs(b), max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=stop_ids, synced_gpus=zero3)
        texts = tokenizer.batch_decode(gen[:, b["input_ids"].shape[1]:], skip_special_tokens=True)
        results += [(i, normalize(t) == normalize(a), t) for i, t, a in zip(index, texts, answers)]
    gathered = engine.all_gather_object(results)
    unique = {i: (ok, t) for part in gathered for i, ok, t in part}  # drop shard-padding duplicates
    correct = sum(ok for ok, _ in unique.values())
    model.train(was_training)
    return {"loss": loss_sum / max(n_valid, 1.0), "accuracy": correct / len(unique), "correct": correct,
            "samples": len(unique), "examples": [unique[i][1] for i in sorted(unique)[:5]]}


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
        ids = tokenize([(prompt, False)], self.tokenizer, image_ids)["input_ids"]
        item["input_ids"] = item["labels"] = torch.tensor(ids)
        item["answer"], item["index"] = messages[-1]["content"], i
        return item
