"""Training data as users have it, read into one form: {"id", "images": [path], "messages": [{role, content}]}.

Accepted:
- LLaVA / Bunny JSON (a list) and JSONL: ``{"id", "image" (optional, or a list), "conversations": [{"from":
  "human"|"gpt"|"system", "value"}]}`` with ``<image>`` in a human turn; text-only samples have no image.
- The ``messages`` + ``images`` style of LLaMA-Factory / TRL (ShareGPT / OpenAI roles: user, assistant, system;
  ``content`` or ``value``).
- Either of those already on disk as a ``datasets`` directory (``save_to_disk``), Parquet or Arrow files, with
  image paths as strings.

Reading never holds the samples as Python objects all at once: ``records`` yields one raw record at a time
(JSON lists are decoded element by element), and ``normalize`` checks one record. A problem with one sample is a
``BadSample`` with a reason from ``REASONS``; only a file that cannot be read at all raises ``ValueError``.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from .templates import IMAGE_PLACEHOLDER

# Why a sample is dropped (report.json counts them by these names).
REASONS = {
    "malformed_json": "the line or record is not valid JSON",
    "missing_conversations": "no 'conversations' or 'messages' list",
    "bad_turns": "a turn without a known role or text content, or no user turn before the first reply",
    "no_assistant_reply": "no assistant turn",
    "empty_reply": "an assistant turn with empty text",
    "image_count_mismatch": "the number of <image> placeholders differs from the number of images",
    "image_outside_folder": "an image path leaves --image-folder (absolute, '..', or a link pointing out); not opened "
                            "(--allow-outside-images accepts them)",
    "missing_image": "an image file does not exist",
    "unreadable_image": "an image file is not an image or is truncated / corrupt",
    "image_too_small": "an image side is below the minimum",
    "image_too_large": "an image has more pixels than the maximum",
    "image_aspect_ratio": "the model's image processor refuses the image's shape (Qwen2-VL: sides more than 200:1)",
    "too_long": "longer than --max-length in tokens (image tokens included); never cut, dropped",
    "template_error": "the conversation cannot be rendered by the template",
}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_CHUNK = 1 << 24


class BadSample(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def kind(path: str) -> str:
    """The input format of ``path``: json | jsonl | datasets | parquet | arrow."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return "datasets"
        raise ValueError(f"--data {path} is a directory but not a `datasets` save_to_disk directory (no state.json) "
                         "nor a prepared one (no prepare.json); give a JSON / JSONL / Parquet / Arrow file or such a "
                         "directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    kinds = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
    if ext not in kinds:
        raise ValueError(f"--data {path}: unknown file type {ext!r}; give .json (a LLaVA list), .jsonl, .parquet, "
                         ".arrow or a `datasets` directory")
    return kinds[ext]


def records(path: str) -> Iterator[tuple[int, str]]:
    """(line number or row index, the record as JSON text), one at a time.

    JSONL lines are passed on undecoded (a malformed line becomes a counted bad sample later); a JSON list is
    decoded element by element, and a syntax error in it raises ValueError with its line and column, since the
    rest of the list cannot be located reliably.
    """
    k = kind(path)
    if k == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line
    elif k == "json":
        yield from _json_list(path)
    else:
        yield from _table(path, k)


def _json_list(path: str) -> Iterator[tuple[int, str]]:
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, line, eof = f.read(_CHUNK), 0, 1, False  # line: line number at buf[pos]

        def skip_ws() -> None:
            nonlocal buf, pos, line, eof
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or eof:
                    return
                more = f.read(_CHUNK)
                eof = not more
                buf, pos = buf[pos:] + more, 0

        def fail(what: str):
            raise ValueError(f"{path} is not a valid LLaVA JSON list: {what} at line {line}; fix the file (or convert "
                             "it to JSONL, where a bad line is skipped and counted)")

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            fail("expected '[' (a JSON list of samples)")
        pos += 1
        first = True
        while True:
            skip_ws()
            if pos < len(buf) and buf[pos] == "]":
                return
            if not first:
                if pos >= len(buf) or buf[pos] != ",":
                    fail("expected ',' or ']' after a sample")
                pos += 1
                skip_ws()
            first = False
            while True:  # decode one element, reading more of the file while it is incomplete
                try:
                    _, end = dec.raw_decode(buf, pos)
                    break
                except RecursionError:
                    fail("a sample nested too deeply to decode")
                except json.JSONDecodeError as e:
                    if eof:
                        line += buf.count("\n", pos, e.pos)
                        fail(f"{e.msg} (column {e.colno})")
                    more = f.read(_CHUNK)
                    eof = not more
                    buf, pos = buf[pos:] + more, 0
                except ValueError as e:  # valid syntax Python refuses (an integer of more than 4,300 digits)
                    fail(str(e)[:200])
            yield line, buf[pos:end]
            line += buf.count("\n", pos, end)
            pos = end


def _table(path: str, k: str) -> Iterator[tuple[int, str]]:
    import datasets

    if k == "datasets":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"--data {path} is a DatasetDict without a 'train' split; splits: {list(ds)}")
            ds = ds["train"]
    elif k == "parquet":
        ds = datasets.Dataset.from_parquet(path)
    else:
        ds = datasets.Dataset.from_file(path)
    for name, feature in ds.features.items():
        if _holds_images(feature):
            raise ValueError(f"--data {path}: column {name!r} holds embedded images; this pipeline reads image files "
                             "by path (column 'image' or 'images' as strings, relative to --image-folder); write the "
                             "images out and store their paths")
    for i, row in enumerate(ds):
        yield i, json.dumps(row, default=str)


def _holds_images(feature) -> bool:
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    inner = getattr(feature, "feature", None)
    if isinstance(feature, list):
        inner = feature[0] if feature else None
    return inner is not None and _holds_images(inner)


def normalize(text: str) -> dict:
    """One raw record -> {"id", "images", "messages", "category"}; raises BadSample naming what is wrong.
    ``category`` (optional, any string): the group evaluation reports accuracy per (e.g. the demo's color /
    shape / position)."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSample("malformed_json", f"{e.msg} (column {e.colno})") from None
    except ValueError as e:  # valid syntax Python refuses, e.g. an integer of more than 4,300 digits
        raise BadSample("malformed_json", str(e)[:200]) from None
    except RecursionError:
        raise BadSample("malformed_json", "nested too deeply to decode") from None
    if not isinstance(rec, dict):
        raise BadSample("missing_conversations", f"the record is a {type(rec).__name__}, not an object")
    turns = rec.get("conversations", rec.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise BadSample("missing_conversations", "no non-empty 'conversations' or 'messages' list")
    messages = []
    for j, t in enumerate(turns):
        name = t.get("from", t.get("role")) if isinstance(t, dict) else None
        role = ROLES.get(name) if isinstance(name, str) else None
        content = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if role is None or not isinstance(content, str):
            raise BadSample("bad_turns", f"turn {j} has no known role (from/role: human, gpt, user, assistant, "
                                         f"system) or no text (value/content)")
        messages.append({"role": role, "content": content})
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise BadSample("no_assistant_reply", f"roles {[m['role'] for m in messages]}")
    if any(not m["content"].strip() for m in replies):
        raise BadSample("empty_reply", "an assistant turn has empty text")
    first = next(i for i, m in enumerate(messages) if m["role"] != "system")
    if messages[first]["role"] != "user" or any(m["role"] == "system" for m in messages[first:]):
        raise BadSample("bad_turns", "the conversation must open (after an optional system turn) with a user turn")
    while messages[-1]["role"] != "assistant":  # trailing user turns have no reply to train on
        messages.pop()
    images = rec.get("image", rec.get("images")) or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadSample("image_count_mismatch", "'image' / 'images' must be a path or a list of paths")
    n = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n != len(images):
        raise BadSample("image_count_mismatch", f"{n} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] != "user"):
        raise BadSample("image_count_mismatch", f"{IMAGE_PLACEHOLDER} outside a user turn")
    category = rec.get("category", "")
    return {"id": str(rec.get("id", "")), "images": images, "messages": messages,
            "category": category if isinstance(category, str) else str(category)}
