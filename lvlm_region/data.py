"""LLaVA-format conversation data: read, render with a template, tokenize, mask, batch.

Input is LLaVA's JSON list: {"id", "image" (optional, relative to the image folder),
"conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}.
Loss is taken only on assistant replies and their end-of-sequence token.
"""
from __future__ import annotations

import atexit
import functools
import json
import logging
import multiprocessing
import multiprocessing.util  # registers its exit hook now, so ours (below) runs before it
import os
import signal
from dataclasses import dataclass

import datasets
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
IGNORE = -100
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Template:
    """How a conversation becomes text. Human text is never trained on; assistant replies are."""

    name: str
    system: str  # text before the first turn ("" for none)
    user: str  # format of a human turn, with {text}
    assistant_prefix: str  # text that opens an assistant turn (not trained on)
    image_only_prompt: bool = False  # plain: the human turn is reduced to its image


TEMPLATES = {
    # Stage 1 (LLaVA "plain"): image tokens followed by the caption.
    "plain": Template("plain", system="", user="{text}", assistant_prefix="", image_only_prompt=True),
    # LLaVA-1.5 "vicuna_v1".
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, user=" USER: {text}", assistant_prefix=" ASSISTANT:"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def read_llava_json(path: str) -> list[dict]:
    """Read and validate a LLaVA JSON list; errors name the sample and what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path) as f:
        try:
            samples = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"{path} must hold a non-empty JSON list of LLaVA samples")
    for i, s in enumerate(samples):
        conv = s.get("conversations") if isinstance(s, dict) else None
        where = f"{path} sample {i} (id {s.get('id') if isinstance(s, dict) else None!r})"
        if not isinstance(conv, list) or len(conv) < 2:
            raise ValueError(f"{where}: needs 'conversations' with at least a human and a gpt turn")
        roles = [t.get("from") for t in conv]
        if roles[0] != "human" or any(r not in ("human", "gpt") for r in roles) or roles[-1] != "gpt":
            raise ValueError(f"{where}: turns must alternate human/gpt, start with human and end with gpt; got {roles}")
        n_img = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
        if n_img != (1 if s.get("image") else 0):
            raise ValueError(f"{where}: has {n_img} {IMAGE_PLACEHOLDER} placeholders but "
                             f"{'one image' if s.get('image') else 'no image'}")
    return samples


def render(conversations: list[dict], template: Template) -> list[tuple[str, bool]]:
    """Conversation -> [(text, trained)] segments, in order."""
    segs: list[tuple[str, bool]] = [(template.system, False)] if template.system else []
    for turn in conversations:
        text = turn["value"]
        if turn["from"] == "human":
            if template.image_only_prompt:
                text = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in text else ""
            segs.append((template.user.format(text=text) + template.assistant_prefix, False))
        else:
            segs.append((" " + text.strip() if template.assistant_prefix else text.strip(), True))
    return segs


def tokenize(segments: list[tuple[str, bool]], tokenizer, image_token_id: int, n_image_tokens: int) -> dict:
    """Token ids and labels; each <image> becomes n_image_tokens image tokens; trained segments end in EOS."""
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE] * len(ids)
    for text, trained in segments:
        seg: list[int] = []
        for j, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if j:
                seg += [image_token_id] * n_image_tokens
            if piece.strip():
                seg += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if trained:
            seg.append(tokenizer.eos_token_id)
        ids += seg
        labels += seg if trained else [IGNORE] * len(seg)
    return {"input_ids": ids, "labels": labels}


@dataclass
class Tokenized:
    """What the model needs to know about tokens: the image token and how many per image."""

    tokenizer: object
    image_token_id: int
    n_image_tokens: int
    template: Template
    max_length: int


def build_dataset(path: str, tok: Tokenized) -> datasets.Dataset:
    """Read, validate, render and tokenize a LLaVA JSON file into a ``datasets.Dataset``.

    Samples longer than max_length are dropped (never truncated through image tokens) and counted.
    """
    samples = read_llava_json(path)
    raw = datasets.Dataset.from_list([{"id": str(s.get("id", i)), "image": s.get("image") or "",
                                       "conversations": json.dumps(s["conversations"])}
                                      for i, s in enumerate(samples)])

    def encode(ex):
        out = tokenize(render(json.loads(ex["conversations"]), tok.template), tok.tokenizer,
                       tok.image_token_id, tok.n_image_tokens)
        out["length"] = len(out["input_ids"])
        return out

    ds = raw.map(encode, keep_in_memory=True)
    keep = ds.filter(lambda ex: ex["length"] <= tok.max_length, keep_in_memory=True)
    if len(keep) < len(ds):
        log.warning("%s: dropped %d of %d samples longer than max_length %d", path, len(ds) - len(keep),
                    len(ds), tok.max_length)
    if len(keep) == 0:
        raise ValueError(f"{path}: every sample is longer than max_length {tok.max_length}; raise --max-length")
    return keep


class ImageTextDataset(torch.utils.data.Dataset):
    """Tokenized samples; images are read and processed lazily (in DataLoader workers)."""

    def __init__(self, ds: datasets.Dataset, image_folder: str, image_processor):
        self.ds, self.image_folder, self.image_processor = ds, image_folder, image_processor

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        ex = self.ds[i]
        item = {"input_ids": torch.tensor(ex["input_ids"]), "labels": torch.tensor(ex["labels"])}
        if ex["image"]:
            with Image.open(os.path.join(self.image_folder, ex["image"])) as im:
                item["pixel_values"] = self.image_processor(im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return item


def check_images(ds: datasets.Dataset, image_folder: str) -> None:
    """Fail before training if any referenced image file is missing."""
    missing = [p for p in ds["image"] if p and not os.path.isfile(os.path.join(image_folder, p))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image files are missing under --image-folder {image_folder}, "
                                f"e.g. {missing[0]}; check --image-folder")


@dataclass(frozen=True)
class DummyImage:
    """What a batch without images gets appended so the vision tower still runs (see collate)."""

    image_token_id: int
    n_image_tokens: int
    image_size: int


def collate(batch: list[dict], pad_token_id: int, left_pad: bool = False, dummy: DummyImage | None = None) -> dict:
    """Pad to the longest sample. input_ids/labels/attention_mask: [B, T]; pixel_values: [n_images, 3, H, W].

    With ``dummy``, a batch without images gets one zero image whose tokens are appended to row 0 behind
    everything else, masked out and unlabelled: real tokens cannot attend to them (they come last under a
    causal mask) and the loss ignores them, so the result is unchanged, but every rank runs the vision tower
    and projector at the same point of the forward. Under ZeRO-3 a rank that skipped them would issue
    different parameter gathers from the others and stall or corrupt the collectives.
    """
    T = max(len(b["input_ids"]) for b in batch)
    images = [b["pixel_values"] for b in batch if "pixel_values" in b]
    extra = dummy.n_image_tokens if (dummy is not None and not images and not left_pad) else 0
    ids = torch.full((len(batch), T + extra), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), T + extra), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T + extra), dtype=torch.long)
    for r, b in enumerate(batch):
        n = len(b["input_ids"])
        sl = slice(T - n, T) if left_pad else slice(0, n)
        ids[r, sl], labels[r, sl], mask[r, sl] = b["input_ids"], b["labels"], 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "real_images": len(images)}
    if extra:
        ids[0, T:] = dummy.image_token_id
        images = [torch.zeros(3, dummy.image_size, dummy.image_size)]
    if images:
        out["pixel_values"] = torch.stack(images)
    for key in batch[0].keys() - out.keys() - {"pixel_values"}:  # anything else (index, answer) as a list
        out[key] = [b[key] for b in batch]
    return out


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch part-way: ``skip`` drops the first indices of ``skip_epoch``.

    The order is DistributedSampler's (deterministic per seed and epoch), so a resumed run reads exactly the
    samples the uninterrupted run would have read next, without loading the skipped ones.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_epoch, self.skip = 0, 0

    def __iter__(self):
        indices = list(super().__iter__())
        start = self.skip if self.epoch == self.skip_epoch else 0
        return iter(indices[start:])


def _quiet_worker(_: int) -> None:
    # Workers ignore the stop signals: the training process handles them and shuts its workers down itself.
    # (A launcher that signals the whole process tree would otherwise kill a worker mid-save and raise.)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


@atexit.register
def _kill_workers_left_at_exit() -> None:
    """Kill the DataLoader workers still running when the interpreter exits.

    When a loader's iterator is still referenced at exit (an exception's traceback holds it), torch leaves its
    workers to multiprocessing's exit hook, which sends them SIGTERM and joins them. Ours ignore SIGTERM
    (_quiet_worker), so that join would wait forever and the rank would hang instead of failing. Registered
    after multiprocessing's hook, this runs before it. Workers only read data: nothing is lost. torch's SIGCHLD
    handler would raise on the first killed worker and end this hook early, so it is reset first.
    """
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in workers:
        p.kill()
    for p in workers:
        p.join(5)


def make_loader(ds: torch.utils.data.Dataset, micro_batch: int, pad_token_id: int, rank: int, world_size: int,
                seed: int, shuffle: bool, drop_last: bool, num_workers: int, left_pad: bool = False,
                dummy: DummyImage | None = None):
    """A rank's DataLoader: ResumableSampler (deterministic per seed and epoch) + padding collate.

    The loader has its own generator so that creating an iterator never draws from the global torch RNG:
    a resumed run creates its iterator at a different point than the uninterrupted one.
    """
    sampler = ResumableSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                               drop_last=drop_last)
    return torch.utils.data.DataLoader(ds, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
                                       drop_last=drop_last, worker_init_fn=_quiet_worker,
                                       generator=torch.Generator().manual_seed(seed),
                                       collate_fn=functools.partial(
                                           collate, pad_token_id=pad_token_id, left_pad=left_pad, dummy=dummy))


class BatchStream:
    """Endless micro-batches over epochs, with an exact position: (epoch, micro-batches consumed in it).

    The position counts what the training loop took, not what workers prefetched, so a checkpoint's
    ``state_dict`` resumes at the next unseen micro-batch.
    """

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader, self.epoch, self.consumed, self._it = loader, 0, 0, None

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                sampler = self.loader.sampler
                sampler.set_epoch(self.epoch)
                sampler.skip_epoch, sampler.skip = self.epoch, self.consumed * self.loader.batch_size
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it, self.epoch, self.consumed = None, self.epoch + 1, 0
                continue
            self.consumed += 1
            return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed, self._it = state["epoch"], state["consumed"], None


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to the device; images to the compute dtype."""
    out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out
