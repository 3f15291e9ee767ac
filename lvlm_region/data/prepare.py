"""Data preparation: validate every sample, render it with the template, tokenize, write a `datasets` directory.

The output directory is a ``datasets.load_from_disk`` directory with the columns
``id, messages (JSON), images, input_ids, labels, length, modality (image | text), line`` plus
``report.json`` (samples kept and dropped, per reason, and every dropped sample with its line and reason) and
``prepare.json`` (what the data was prepared from and with; written last, so its presence marks a complete
directory). A second run with the same inputs finds ``prepare.json`` and returns at once.

Samples stream from the file into an Arrow table on disk (``datasets.Dataset.from_generator``) and are encoded
by ``Dataset.map`` over worker processes, which writes its results to disk in batches: no step holds every
sample's token ids in Python lists.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import datasets

from transformers import AutoConfig

from ..config import check_options
from ..infra import outputs
from ..model import families
from ..model.image_inputs import ImageLayout
from . import formats, images
from .formats import BadSample
from .templates import IMAGE_PLACEHOLDER, ChatFormat, TemplateError, resolve

log = logging.getLogger(__name__)

VERSION = 3  # bump when the encoding changes, so older prepared directories are rebuilt (2: one-string tokenization,
#             3: the category column)
MARKER = "prepare.json"
REPORT = "report.json"
FEATURES = datasets.Features({
    "line": datasets.Value("int64"), "id": datasets.Value("string"), "category": datasets.Value("string"),
    "messages": datasets.Value("string"),
    "images": datasets.Sequence(datasets.Value("string")), "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")), "length": datasets.Value("int32"),
    "modality": datasets.Value("string"), "reason": datasets.Value("string"), "detail": datasets.Value("string"),
    "lossy": datasets.Value("string")})


class DataError(ValueError):
    """The data as a whole is unusable (too many bad samples, or a bad one under --on-bad-sample error)."""


@dataclass(frozen=True)
class Encoding:
    """Everything that decides how a sample is encoded (its digest names a prepared directory's contents)."""

    template: ChatFormat
    layout: ImageLayout  # what each image becomes in the text (a fixed count, or Qwen2-VL's per-size count)
    max_length: int
    verify_images: str = "decode"  # decode: find truncated / corrupt files now | header: size checks only
    allow_outside_images: bool = False  # accept image paths that leave the image folder (absolute, '..', links)


def for_model(model_path: str, template: str, max_length: int, verify_images: str = "decode",
              aspect: str | None = None, allow_outside_images: bool = False, stage: str = "sft"):
    """(Encoding, tokenizer, processor) of a transformers checkpoint dir: its image layout (image_inputs; from the
    config and image processor, with ``aspect`` = --image-aspect-ratio, by default ``stage``'s for the family) and the
    template resolved against its tokenizer (``auto``: the tokenizer's own, else the processor's)."""
    config = AutoConfig.from_pretrained(model_path)
    family = families.check_trainable(config, f"--model {model_path}")
    aspect = aspect or family.default_aspect(stage)
    images.check_aspect(aspect)
    processor = family.load_processor(model_path)
    tokenizer = processor.tokenizer
    fmt = resolve(template, tokenizer, f"--model {model_path}", getattr(processor, "chat_template", None))
    layout = family.image_layout(config, processor, aspect)
    return Encoding(fmt, layout, max_length, verify_images, allow_outside_images), tokenizer, processor


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token], default=str)
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def _token_identity(enc: Encoding, tokenizer) -> dict:
    """The part of a preparation's identity that decides its token ids and labels (a run must match it)."""
    return {"template_digest": enc.template.digest, "tokenizer_digest": tokenizer_digest(tokenizer),
            **enc.layout.identity(), "max_length": enc.max_length, "version": VERSION}


def identity(data: str, image_folder: str, enc: Encoding, tokenizer) -> dict:
    """What a prepared directory was made from and with; equal identities give identical directories."""
    marker = next((os.path.join(data, f) for f in ("state.json", "dataset_dict.json")
                   if os.path.isfile(os.path.join(data, f))), None) if os.path.isdir(data) else data
    st = os.stat(marker) if marker and os.path.isfile(marker) else None  # a datasets dir: its state file
    return {"data": os.path.abspath(data), "data_size": st.st_size if st else None,
            "data_mtime_ns": st.st_mtime_ns if st else None, "image_folder": os.path.abspath(image_folder),
            "template": enc.template.name, "verify_images": enc.verify_images,
            "allow_outside_images": enc.allow_outside_images, **_token_identity(enc, tokenizer)}


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def read_meta(path: str) -> dict:
    """A prepared directory's prepare.json (without opening the dataset)."""
    with open(os.path.join(path, MARKER)) as f:
        return json.load(f)


def load_prepared(path: str) -> tuple[datasets.Dataset, dict]:
    """A prepared directory's dataset and its prepare.json."""
    return datasets.load_from_disk(path), read_meta(path)


def check_matches(meta: dict, path: str, enc: Encoding, tokenizer) -> None:
    """Refuse a prepared directory made for another tokenizer, template, image token count or max length."""
    want = _token_identity(enc, tokenizer)
    have = meta["identity"]
    diff = [f"{k}: prepared {have.get(k)!r}, this run {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise ValueError(f"--data {path} was prepared for another model or settings ({'; '.join(diff)}); prepare it "
                         f"again with this run's --model / --template / --max-length, or pass the raw data file")
    if have.get("allow_outside_images") and not enc.allow_outside_images:
        raise ValueError(f"--data {path} was prepared with --allow-outside-images, so its samples may read images "
                         "outside its image folder (absolute paths, '..', links), which this run does not allow; pass "
                         "--allow-outside-images to accept them, or prepare the data again without it")


def check_output(output: str) -> None:
    """Refuse an output that is not an earlier preparation (its prepare.json, or only the report.json of a failed
    one): preparing replaces the directory whole, so ``--output /data/images`` would delete the images."""
    outputs.check_replaceable(output, MARKER, "preparation", "--output", also_ours=(REPORT,))


def _rows(path: str):
    for line, raw in formats.records(path):
        yield {"line": line, "raw": raw}


def image_token_ids(paths: list[str], image_folder: str, layout: ImageLayout, decode: bool,
                    allow_outside: bool = False) -> list[list[int]]:
    """Each image's token ids, from its header size (images.check; ``decode``: a full decode too). Raises BadSample
    for an image that is missing, unreadable, out of bounds or of a shape the model's resize refuses, and (unless
    ``allow_outside``) for a path that leaves ``image_folder``, before opening it."""
    files, sizes = [], []
    for p in paths:
        files.append(images.inside_folder(image_folder, p, allow_outside))
        sizes.append(images.check(files[-1], decode=decode))
    try:
        return layout.sample_token_ids(sizes)  # a sample's images together: LLaVA-OneVision's count depends on it
    except ValueError as e:  # Qwen2-VL's resize refuses an aspect ratio beyond 200:1
        shapes = ", ".join(f"{f} is {w}x{h}" for f, (w, h) in zip(files, sizes))
        raise BadSample("image_aspect_ratio", f"{shapes}: {e}") from None


def encode(row: dict, image_folder: str, enc: Encoding, tokenizer) -> dict:
    """One raw record -> its encoded row; a bad sample gets a ``reason`` (and empty ids) instead of raising."""
    out = {"line": row["line"], "id": "", "category": "", "messages": "", "images": [], "input_ids": [], "labels": [],
           "length": 0, "modality": "", "reason": "", "detail": "", "lossy": ""}
    try:
        s = formats.normalize(row["raw"])
        out["id"], out["category"] = s["id"], s["category"]
        image_ids = image_token_ids(s["images"], image_folder, enc.layout, decode=enc.verify_images == "decode",
                                    allow_outside=enc.allow_outside_images)
        try:
            ids = enc.template.tokenize(tokenizer, enc.template.segments(tokenizer, s["messages"]), image_ids,
                                        enc.layout.text_around)
        except TemplateError as e:
            raise BadSample("template_error", str(e)) from None
        n = len(ids["input_ids"])
        if n > enc.max_length:
            raise BadSample("too_long", f"{n} tokens > --max-length {enc.max_length}")
    except BadSample as e:
        out["reason"], out["detail"] = e.reason, e.detail
        return out
    out.update(messages=json.dumps(s["messages"]), images=s["images"], length=n,
               modality="image" if s["images"] else "text", lossy=lossy_text(s["messages"], tokenizer), **ids)
    return out


def lossy_text(messages: list[dict], tokenizer) -> str:
    """The first message text that does not come back from a tokenize / decode round trip ("" if all do): characters
    the tokenizer has no piece for (and no byte fallback) are lost or become <unk>, silently, in training."""
    for m in messages:
        for piece in m["content"].split(IMAGE_PLACEHOLDER):
            if not piece.strip():
                continue
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if back.strip() != piece.strip():
                return piece.strip()
    return ""


def prepare(data: str, image_folder: str, enc: Encoding, tokenizer, output: str, on_bad_sample: str = "skip",
            max_bad_fraction: float = 0.05, workers: int | None = None) -> datasets.Dataset:
    """Prepare ``data`` into ``output`` (or reuse it when it was prepared from the same inputs); returns it.

    Raises DataError when more than ``max_bad_fraction`` of the samples are bad, or with ``on_bad_sample="error"``
    when any is; report.json is written to ``output`` either way.
    """
    check_options(on_bad_sample, max_bad_fraction, enc.verify_images)
    check_output(output)
    ident = identity(data, image_folder, enc, tokenizer)
    if is_prepared(output) and read_meta(output)["identity"] == ident:
        log.info("%s: already prepared from %s; reusing it", output, data)
        return datasets.load_from_disk(output)
    formats.kind(data)  # a clear error for a missing / unknown input before any work
    start = time.perf_counter()
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
    try:
        raw = datasets.Dataset.from_generator(_rows, gen_kwargs={"path": data}, cache_dir=os.path.join(work, "cache"),
                                              features=datasets.Features({"line": datasets.Value("int64"),
                                                                          "raw": datasets.Value("string")}))
        if len(raw) == 0:
            raise DataError(f"--data {data} holds no samples")
        procs = max(1, min(workers or os.cpu_count() or 1, len(raw) // 2000))
        encoded = raw.map(encode, fn_kwargs={"image_folder": image_folder, "enc": enc, "tokenizer": tokenizer},
                          remove_columns=["raw"], features=FEATURES, num_proc=procs if procs > 1 else None,
                          cache_file_name=os.path.join(work, "cache", "encoded.arrow"), desc="encoding samples")
        bad = encoded.filter(lambda r: [x != "" for x in r], input_columns="reason", batched=True)
        dropped = bad.select_columns(["line", "id", "reason", "detail"]).to_list()
        good = encoded.filter(lambda r: [x == "" for x in r], input_columns="reason", batched=True)
        lossy = good.filter(lambda r: [x != "" for x in r], input_columns="lossy", batched=True)
        good = good.remove_columns(["reason", "detail", "lossy"])
        report = _report(data, len(raw), good, dropped, time.perf_counter() - start)
        report["lossy_text"] = len(lossy)
        if len(lossy):
            ex = lossy[0]
            report["lossy_text_example"] = {"line": ex["line"], "id": ex["id"], "text": ex["lossy"][:200]}
            log.warning("%s: %d of %d kept samples have text the tokenizer does not reproduce (characters it has no "
                        "piece for are dropped or become <unk>); e.g. line %d (id %r): %.80r", data, len(lossy),
                        len(good), ex["line"], ex["id"], ex["lossy"])
        stage = os.path.join(work, "out")
        fraction = len(dropped) / len(raw)
        problem = None
        if on_bad_sample == "error" and dropped:
            d = dropped[0]
            problem = (f"--on-bad-sample error: {data} line/row {d['line']} (id {d['id']!r}) is bad: {d['reason']}: "
                       f"{d['detail']} ({len(dropped)} bad samples in all)")
        elif fraction > max_bad_fraction:
            problem = (f"{data}: {len(dropped)} of {len(raw)} samples ({fraction:.1%}) are bad, more than "
                       f"--max-bad-fraction {max_bad_fraction:.1%}: " + _summary(report))
        if problem is None:
            good.save_to_disk(stage)
        else:
            os.makedirs(stage)
        with open(os.path.join(stage, REPORT), "w") as f:
            json.dump(report, f, indent=1)
        if problem is None:
            with open(os.path.join(stage, MARKER), "w") as f:
                json.dump({"identity": ident, "kept": len(good), "dropped": len(dropped)}, f, indent=1)
        outputs.replace_dir(stage, output, MARKER, "preparation", "--output", also_ours=(REPORT,))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if problem is not None:
        raise DataError(f"{problem}; every dropped sample is listed in {os.path.join(output, REPORT)}")
    log.info("prepared %s -> %s: kept %d of %d samples (%s) in %.1f s", data, output, len(good), len(raw),
             _summary(report) or "none dropped", report["seconds"])
    return datasets.load_from_disk(output)


def _report(data: str, total: int, good: datasets.Dataset, dropped: list[dict], seconds: float) -> dict:
    by_reason: dict[str, int] = {}
    for d in dropped:
        by_reason[d["reason"]] = by_reason.get(d["reason"], 0) + 1
    modality = good["modality"] if len(good) else []
    return {"data": os.path.abspath(data), "samples": total, "kept": len(good), "dropped": len(dropped),
            "dropped_by_reason": dict(sorted(by_reason.items())), "reasons": {k: formats.REASONS[k] for k in by_reason},
            "kept_with_images": sum(m == "image" for m in modality),
            "kept_text_only": sum(m == "text" for m in modality),
            "tokens": int(sum(good["length"])) if len(good) else 0, "seconds": round(seconds, 2),
            "dropped_samples": dropped}


def _summary(report: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in report["dropped_by_reason"].items())
