"""Prepared samples -> batches: lazy image loading, padding collate, resumable sharded sampling.

Samples come from ``lvlm_region.data.prepare`` (token ids, labels, image paths). Images are read in DataLoader
workers; an image that fails to decode is replaced by the next sample that loads, and counted.
"""
from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import multiprocessing.util  # registers its exit hook now, so ours (below) runs before it
import os
import signal

import torch

from ..model.image_inputs import DummyImage, ImageLayout
from .images import DECODE_ERRORS, ImageLoader
from .templates import IGNORE

log = logging.getLogger(__name__)
MAX_REPLACEMENTS = 64  # consecutive undecodable samples before a worker gives up (the data is broken, not a file)


class ImageTextDataset(torch.utils.data.Dataset):
    """Prepared samples; images are read and processed lazily (in DataLoader workers).

    An item is {input_ids, labels, replaced, n_images} plus, for a sample with images, its images' tensors
    concatenated along the first dimension (the layout's tensor_keys: pixel_values [n_images, 3, H, W] for Llava;
    flattened patches and image_grid_thw for Qwen2-VL); ``n_images`` is the layout's count of its images. If a
    sample's image fails to decode (a file truncated or changed after preparation, or resized so that it no longer
    gives the image tokens prepared for it), the next sample in the data that loads takes its place and ``replaced``
    counts the samples skipped: training never stops on one bad file.
    """

    def __init__(self, ds, image_folder: str, load_image: ImageLoader, layout: ImageLayout):
        self.ds, self.image_folder, self.load_image, self.layout = ds, image_folder, load_image, layout

    def __len__(self) -> int:
        return len(self.ds)

    def _images(self, ex: dict) -> dict | None:
        """The sample's image tensors ({} without images), or None when one cannot be used (logged)."""
        if not ex["images"]:
            return {}
        paths = [os.path.join(self.image_folder, p) for p in ex["images"]]
        try:
            tensors = self.layout.load_sample(self.load_image, paths)
        except DECODE_ERRORS as e:
            log.warning("sample %r: image %s failed to decode (%s: %s); using the next sample instead",
                        ex["id"], " or ".join(paths), type(e).__name__, e)
            return None
        want = sum(i == self.layout.image_token_id for i in ex["input_ids"])
        got = self.layout.tokens_in(tensors)
        if got != want:
            log.warning("sample %r: its images give %d image tokens, %d were prepared (an image changed size since "
                        "preparation?); using the next sample instead", ex["id"], got, want)
            return None
        return tensors

    def __getitem__(self, i: int) -> dict:
        for replaced in range(MAX_REPLACEMENTS):
            ex = self.ds[(i + replaced) % len(self.ds)]
            tensors = self._images(ex)
            if tensors is not None:
                return {"input_ids": torch.tensor(ex["input_ids"]), "labels": torch.tensor(ex["labels"]),
                        "replaced": replaced, "n_images": self.layout.count_images(tensors), **tensors}
        raise RuntimeError(f"{MAX_REPLACEMENTS} samples in a row from index {i} have images that fail to decode; "
                           f"check --image-folder {self.image_folder} and the files")


def _counts(batch: list[dict]) -> dict:
    """What the training loop counts of a micro-batch, however it is laid out."""
    return {"replaced": sum(b.get("replaced", 0) for b in batch), "n_tokens": sum(len(b["input_ids"]) for b in batch),
            "n_samples": len(batch)}


TEXT_KEYS = ("input_ids", "labels")  # a sample's tensors that are not its images'


def _image_tensors(batch: list[dict]) -> list[dict]:
    """Each sample's image tensors ({key: tensor}: its tensors but the text's), for the samples that have images."""
    return [{k: v for k, v in b.items() if isinstance(v, torch.Tensor) and k not in TEXT_KEYS} for b in batch
            if "pixel_values" in b]


def _real_images(batch: list[dict]) -> int:
    """Images of the samples (the layout counted them, ImageTextDataset; a sample built by hand: rows of pixels)."""
    return sum(b["n_images"] if "n_images" in b else len(b.get("pixel_values", ())) for b in batch)


def _cat(images: list[dict]) -> dict:
    return {k: torch.cat([x[k] for x in images]) for k in images[0]} if images else {}


def collate(batch: list[dict], pad_token_id: int, left_pad: bool = False, dummy: DummyImage | None = None) -> dict:
    """Pad to the longest sample. input_ids/labels/attention_mask: [B, T]; the image tensors concatenated
    (pixel_values [n_images, 3, H, W] for Llava; see image_inputs).

    With ``dummy``, a batch without images gets one zero image whose tokens are added to row 0 in its padding,
    masked out and unlabelled: behind everything else (right padding; real tokens cannot attend to them under a
    causal mask) or in front of the prompt (``left_pad``, for generation; the attention mask hides them). The
    loss ignores them, so the result is unchanged, but every rank runs the vision tower and projector at the same
    point of the forward. Under ZeRO-3 a rank that skipped them would issue different parameter gathers from the
    others and stall or corrupt the collectives (and transformers' generate fails on a batch without images).
    """
    T = max(len(b["input_ids"]) for b in batch)
    images = _image_tensors(batch)
    extra = len(dummy.ids) if (dummy is not None and not images) else 0
    width = T + extra
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, b in enumerate(batch):
        n = len(b["input_ids"])
        sl = slice(width - n, width) if left_pad else slice(0, n)
        ids[r, sl], labels[r, sl], mask[r, sl] = b["input_ids"], b["labels"], 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "real_images": _real_images(batch),
           "rows": [(len(batch), width)], **_counts(batch)}
    if extra:
        ids[0, slice(0, extra) if left_pad else slice(T, width)] = torch.tensor(dummy.ids)
        images = [dummy.tensors]
    out.update(_cat(images))
    for key in batch[0].keys() - out.keys() - {"n_images"}:  # anything else (index, answer) as a list
        out[key] = [b[key] for b in batch]
    return out


def collate_packed(batch: list[dict], dummy: DummyImage | None = None) -> dict:
    """Padding-free: the micro-batch's samples back to back in one row [1, sum of lengths], positions restarting
    at 0 for each sample and no attention mask, which transformers reads as packed sequences (each sample attends
    only to itself: a block-diagonal causal mask for sdpa / eager, varlen kernels for flash-attention 2).

    Each sample's first label is ignored, so no token is trained to predict the next sample. A text-only micro-batch
    gets the masked dummy image as a sample of its own at the end (see collate).
    """
    images = _image_tensors(batch)
    ids, labels, pos = [], [], []
    for b in batch:
        n = len(b["input_ids"])
        ids.append(b["input_ids"])
        lab = b["labels"].clone()
        lab[0] = IGNORE
        labels.append(lab)
        pos.append(torch.arange(n))
    rows = [(1, len(b["input_ids"])) for b in batch]
    real = _real_images(batch)
    if dummy is not None and not images:
        n = len(dummy.ids)
        ids.append(torch.tensor(dummy.ids))
        labels.append(torch.full((n,), IGNORE))
        pos.append(torch.arange(n))
        rows.append((1, n))
        images = [dummy.tensors]
    out = {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None], "position_ids": torch.cat(pos)[None],
           "real_images": real, "rows": rows, **_counts(batch)}
    out.update(_cat(images))
    return out


def grouped_order(lengths: list[int], is_image: list[bool], micro_batch: int, world_size: int,
                  generator: torch.Generator, group: int = 16) -> list[list[int]]:
    """Global batches (lists of world_size x micro_batch indices) of similar length and one modality.

    As LLaVA's ``group_by_modality_length``: each modality is shuffled, cut into mega-batches of ``group`` global
    batches, each mega-batch sorted by length and cut into global batches; what is left of each modality (less
    than a global batch) goes into mixed global batches, sorted by length, as LLaVA's "additional batch"; all are
    then shuffled together. Fewer than one global batch of samples is left out per epoch.
    """
    size = micro_batch * world_size
    batches: list[list[int]] = []
    rest: list[int] = []
    for flag in (True, False):
        idx = [i for i, f in enumerate(is_image) if f == flag]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
        for m in range(0, len(idx), size * group):
            mega = sorted(idx[m:m + size * group], key=lambda i: -lengths[i])
            full = len(mega) - len(mega) % size
            batches += [mega[k:k + size] for k in range(0, full, size)]
            rest += mega[full:]
    rest.sort(key=lambda i: -lengths[i])
    batches += [rest[k:k + size] for k in range(0, len(rest) - size + 1, size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


class Skippable:
    """An epoch that can start part-way: ``skip`` drops the first indices of epoch ``skip_epoch`` (BatchStream
    sets both on resume), so a resumed run reads exactly the samples the uninterrupted run would have read next,
    without loading the skipped ones. The order itself must be deterministic per seed and epoch."""

    skip_epoch, skip = 0, 0

    def _resumed(self, indices: list[int]):
        return iter(indices[self.skip if self.epoch == self.skip_epoch else 0:])


class GroupedSampler(Skippable, torch.utils.data.Sampler):
    """A rank's indices from ``grouped_order``, deterministic per seed and epoch, resumable (Skippable).

    Within a global batch rank r takes micro-batch r, so every rank's micro-batch has a similar length.
    """

    def __init__(self, lengths: list[int], is_image: list[bool], micro_batch: int, world_size: int, rank: int,
                 seed: int):
        self.lengths, self.is_image = lengths, is_image
        self.micro_batch, self.world_size, self.rank, self.seed = micro_batch, world_size, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        # grouped_order's batch count without drawing it: each modality's full global batches, then as many as
        # the leftovers of both fill.
        size = self.micro_batch * self.world_size
        n_image = sum(self.is_image)
        per_modality = [n_image, len(self.is_image) - n_image]
        batches = sum(n // size for n in per_modality) + sum(n % size for n in per_modality) // size
        return batches * self.micro_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        b, r = self.micro_batch, self.rank
        return self._resumed([i for batch in grouped_order(self.lengths, self.is_image, b, self.world_size, g)
                              for i in batch[r * b:(r + 1) * b]])


class ResumableSampler(Skippable, torch.utils.data.DistributedSampler):
    """DistributedSampler (deterministic per seed and epoch) that can start an epoch part-way (Skippable)."""

    def __iter__(self):
        return self._resumed(list(super().__iter__()))


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
                dummy: DummyImage | None = None, group_by: tuple[list[int], list[bool]] | None = None,
                packed: bool = False):
    """A rank's DataLoader: ResumableSampler (deterministic per seed and epoch) + padding collate.

    ``group_by`` (lengths, has-image flags): GroupedSampler instead (length-grouped, one modality per global
    batch). ``packed``: collate_packed instead of padding.

    The loader has its own generator so that creating an iterator never draws from the global torch RNG:
    a resumed run creates its iterator at a different point than the uninterrupted one.
    """
    if group_by is not None:
        lengths, is_image = group_by
        sampler = GroupedSampler(lengths, is_image, micro_batch, world_size, rank, seed)
    else:
        sampler = ResumableSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                   drop_last=drop_last)
    fn = (functools.partial(collate_packed, dummy=dummy) if packed else
          functools.partial(collate, pad_token_id=pad_token_id, left_pad=left_pad, dummy=dummy))
    return torch.utils.data.DataLoader(ds, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
                                       drop_last=drop_last, worker_init_fn=_quiet_worker,
                                       generator=torch.Generator().manual_seed(seed), collate_fn=fn)


def run_loader(ds: torch.utils.data.Dataset, cfg, pad_token_id: int, dummy: DummyImage, rank: int, world_size: int,
               shuffle: bool, drop_last: bool, left_pad: bool = False, training: bool = False):
    """A rank's loader for a run config ``cfg``; batches without images get the masked ``dummy`` image (collate).
    The training loader groups by length and packs as the config says; evaluation pads and keeps the data's order."""
    group_by = None
    if training and cfg.group_by_length:
        group_by = (list(ds.ds["length"]), [m == "image" for m in ds.ds["modality"]])
    return make_loader(ds, cfg.micro_batch, pad_token_id, rank, world_size, cfg.seed, shuffle, drop_last,
                       cfg.num_workers, left_pad, dummy, group_by, packed=training and cfg.packing)


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
