"""Conversation templates: render a conversation with a chat template and mark what the loss is taken on.

Every template is a Jinja chat template rendered by transformers' own ``apply_chat_template``: the tokenizer's
own one (``auto``) or a built-in one (``plain``, ``vicuna_v1``, ``llama3``, ``phi3``, ``chatml``). The trained
spans are found from renders of the conversation's prefixes, so one rule serves every template:

    assistant turn i trains on  render(m[:i+1]) minus render(m[:i], add_generation_prompt=True),
    cut where render(m[:i+1]) stops agreeing with render(m[:i+1] + [a user turn]) (so a template's
    end-of-conversation text, such as Phi-3's final eos, is not taken for the turn's end), then trailing
    whitespace handed back to the untrained text.

That is the reply and its end-of-turn token (``</s>``, ``<|eot_id|>``, ``<|end|>``, ``<|im_end|>``); every
system and user turn and every generation prompt is masked. A template whose renders are not prefixes of each
other, or that drops a reply, is refused with the turn that shows it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ..config import TEMPLATES

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's marker in the data; Llava's processors emit the same token
IGNORE = -100
# LLaVA-1.5's system prompt: conv_vicuna_v1 in LLaVA's llava/conversation.py, which it trains with (--version v1)
# and evaluates with (--conv-mode vicuna_v1). (conv_llava_v1's "curious human" text is another template's.)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# Message content is a string (LLaVA data: "<image>\nQ") or a list of typed parts (processor style).
_CONTENT = ("{% macro content(m) %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}")

# One line each, without whitespace control: every character outside the tags is output.
BUILTIN = {
    # Stage 1 (LLaVA "plain", conv_llava_plain): the image tokens, then the caption and its separator "\n"; no roles,
    # no instruction (LLaVA's preprocess_plain: DEFAULT_IMAGE_TOKEN + caption + sep).
    "plain": _CONTENT + (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<image>' * (content(m).count('<image>')) }}"
        "{% elif m['role'] == 'assistant' %}{{ content(m) | trim }}{{ '\n' }}{% endif %}{% endfor %}"),
    # LLaVA-1.5 (conv_vicuna_v1): "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>".
    "vicuna_v1": _CONTENT + (
        "{% if messages[0]['role'] == 'system' %}{{ content(messages[0]) }}{% set rest = messages[1:] %}"
        "{% else %}" + VICUNA_SYSTEM + "{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if m['role'] == 'user' %}{{ ' ' if loop.first else '' }}USER: {{ content(m) }}{{ ' ' }}"
        "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ content(m) | trim }}{{ eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
    # Meta Llama-3 instruct.
    "llama3": _CONTENT + (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ content(m) | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    # Microsoft Phi-3 instruct.
    "phi3": _CONTENT + (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ content(m) }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    # ChatML (Qwen).
    "chatml": _CONTENT + (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ content(m) }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
# Special tokens a built-in template writes; a tokenizer without them would spell them out as text.
NEEDS_TOKENS = {"llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                "phi3": ("<|user|>", "<|assistant|>", "<|end|>"), "chatml": ("<|im_start|>", "<|im_end|>")}
NAMES = ("auto", *BUILTIN)
if NAMES != TEMPLATES:  # the run config lists the valid --template values; they must be these
    raise ImportError(f"config.TEMPLATES {TEMPLATES} and the templates defined here {NAMES} differ")


class TemplateError(ValueError):
    """A conversation the template cannot render into trained and untrained spans."""


@dataclass(frozen=True)
class ChatFormat:
    """A resolved template: its name, Jinja source and how message content is passed."""

    name: str  # a BUILTIN name, or "auto" (the tokenizer's own template)
    source: str
    typed_content: bool = False  # content as [{"type": "image"}, {"type": "text", ...}] (processor templates)
    # How the text is tokenized (see tokenize): True for the LLaVA / Bunny templates (BUILTIN), whose models were
    # trained and are evaluated by LLaVA's tokenizer_image_token, which tokenizes the text between images as
    # separate strings; False for the tokenizer's or processor's own template ("auto"), tokenized as one string as
    # the processor does.
    image_chunks: bool = False

    @property
    def digest(self) -> str:
        rule = ":chunks" if self.image_chunks else ""
        return hashlib.sha256(f"{self.typed_content}{rule}:{self.source}".encode()).hexdigest()[:16]

    @property
    def conversational(self) -> bool:
        return self.name != "plain"

    def _messages(self, messages: list[dict]) -> list[dict]:
        if not self.typed_content:
            return messages
        out = []
        for m in messages:
            parts = []
            for j, piece in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
                if j:
                    parts.append({"type": "image"})
                if piece.strip():
                    parts.append({"type": "text", "text": piece.strip() if j else piece})
            out.append({"role": m["role"], "content": parts})
        return out

    def render(self, tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(self._messages(messages), chat_template=self.source, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    def segments(self, tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
        """[(text, trained)] covering the rendered conversation up to its last reply's end-of-turn token."""
        full = self.render(tokenizer, messages)
        out, pos = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(tokenizer, messages[:i], generation_prompt=True)
            start = len(prompt)
            upto = self.render(tokenizer, messages[:i + 1])
            more = self.render(tokenizer, messages[:i + 1] + [{"role": "user", "content": "x"}])
            end = _token_boundary(upto, len(os.path.commonprefix([upto, more])), tokenizer)
            if not (full.startswith(prompt) and upto.startswith(prompt) and full.startswith(upto[:end])) or start > end:
                raise TemplateError(f"template {self.name!r} does not render conversations prefix by prefix (at "
                                    f"message {i}), so the reply's tokens cannot be found; pass another --template "
                                    f"({', '.join(BUILTIN)})")
            # Whitespace after the end-of-turn token goes back to the untrained text; a template that ends a reply
            # with whitespace alone (plain: the caption, then "\n") trains it: it is the end of the turn.
            cut = end
            while cut > start and full[cut - 1].isspace():
                cut -= 1
            if full[start:cut].strip() != m["content"].strip() or not m["content"].strip():
                end = cut
            reply = full[start:end]
            if m["content"].strip() and m["content"].strip() not in reply:
                raise TemplateError(f"template {self.name!r} does not render assistant message {i}'s text where "
                                    f"its turn is; pass another --template ({', '.join(BUILTIN)})")
            out += [(full[pos:start], False), (reply, True)]
            pos = end
        return [(t, trained) for t, trained in out if t]

    def tokenize(self, tokenizer, segments: list[tuple[str, bool]], image_ids: list[list[int]],
                 around: tuple[str, str] = ("", "")) -> dict:
        """``segments`` (of segments() or a prompt) as ids and labels by this template's rule (tokenize)."""
        return tokenize(segments, tokenizer, image_ids, around, chunks=self.image_chunks)

    def prompt(self, tokenizer, messages: list[dict]) -> str:
        """The text a model continues to answer after ``messages`` (which end with a user turn)."""
        return self.render(tokenizer, messages, generation_prompt=True)


def _token_boundary(text: str, end: int, tokenizer) -> int:
    """``end`` moved back to the start of a special token it cuts through (``<|end|>\n<|endoftext|>`` and
    ``<|end|>\n<|user|>`` agree up to ``<|``)."""
    if end == len(text):  # the common case: nothing follows the last reply
        return end
    for t in tokenizer.all_special_tokens:
        for k in range(max(0, end - len(t) + 1), end):
            if text.startswith(t, k) and k + len(t) > end:
                return k
    return end


def resolve(name: str, tokenizer, where: str, processor_template: str | None = None) -> ChatFormat:
    """The template ``name`` for this tokenizer; ``auto`` is the tokenizer's own (else the processor's).

    Raises ValueError naming the checkpoint and the fix when the tokenizer has no template or lacks a built-in
    template's special tokens.
    """
    if name not in NAMES:
        raise ValueError(f"unknown --template {name!r}; known: {', '.join(NAMES)}")
    if name != "auto":
        missing = [t for t in NEEDS_TOKENS.get(name, ()) if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"--template {name} writes the special tokens {missing}, which the tokenizer of {where} "
                             f"does not have (they would be split into text pieces); use the template the LLM was "
                             f"trained with (e.g. --template vicuna_v1, which needs none)")
        return ChatFormat(name, BUILTIN[name], image_chunks=True)
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    candidates = [(own, False), (own, True)] if own else []
    if processor_template:
        candidates += [(processor_template, True), (processor_template, False)]
    if not candidates:
        raise ValueError(f"the tokenizer of {where} has no chat template (tokenizer_config.json / "
                         f"chat_template.jinja), and conversations need one; pass --template with the format the LLM "
                         f"was trained in: vicuna_v1 (LLaVA-1.5 / Vicuna), llama3, phi3 or chatml (Qwen)")
    probe = [{"role": "user", "content": "<image>\nprobe question"}, {"role": "assistant", "content": "probe answer"}]
    for source, typed in candidates:
        fmt = ChatFormat("auto", source, typed)
        try:
            text = fmt.render(tokenizer, probe)
        except Exception:  # noqa: BLE001 - a template that cannot take this content form; try the next
            continue
        if all(s in text for s in ("probe question", "probe answer", IMAGE_PLACEHOLDER)):
            if end_of_turn_id(fmt, tokenizer) not in tokenizer.all_special_ids:
                raise ValueError(f"the chat template of {where} ends a reply without an end-of-turn token (eos or "
                                 f"similar), so a model trained with it never learns to stop; pass --template "
                                 f"({', '.join(BUILTIN)}) with the format the LLM was trained in")
            return fmt
    raise ValueError(f"the chat template of {where} does not render a user message's image and text and an "
                     f"assistant reply (probed with string and typed content); pass --template "
                     f"({', '.join(BUILTIN)})")


def end_of_turn_id(fmt: ChatFormat, tokenizer) -> int:
    """The last token of a trained reply (eos, <|eot_id|>, <|end|>, <|im_end|>): where generation stops."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    return fmt.tokenize(tokenizer, fmt.segments(tokenizer, probe), [])["input_ids"][-1]


def tokenize(segments: list[tuple[str, bool]], tokenizer, image_ids: list[list[int]],
             around: tuple[str, str] = ("", ""), chunks: bool = False) -> dict:
    """Token ids and labels (IGNORE where untrained); the k-th <image> becomes ``image_ids[k]`` (its image tokens,
    as image_inputs.ImageLayout.token_ids gives them for the image's size), with the layout's ``around`` text
    (``text_around``: Gemma 3's "\\n\\n" on either side) written before and after it as plain text, so it merges with
    the neighbouring text as the processor's expansion does. That text never trains.

    Two rules, chosen by the template (ChatFormat.image_chunks):
    - one string (``chunks`` False: the tokenizer's or processor's own template): the segments' text is tokenized as
      one string, as a processor tokenizes the same rendered conversation at inference: each <image> is first
      written as its own image tokens' text (``<image>`` x N for Llava, ``<|vision_start|><|image_pad|>...`` for
      Qwen2-VL; special tokens, so they split the text exactly where the processor's expansion does). Tokenizing
      segments separately would give every later turn the tokenizer's leading-space piece (sentencepiece's "▁"),
      which inference never sees.
    - LLaVA's (``chunks`` True: the LLaVA / Bunny templates): the text between images is tokenized chunk by chunk,
      as LLaVA's ``tokenizer_image_token`` does in training and in its evaluation scripts, so a sentencepiece
      tokenizer writes its "▁" at the start of the text after each image (Vicuna's id 29871 before the "\\n"), as
      LLaVA-1.5 checkpoints were trained with.
    A token is trained when its last character lies in a trained segment. BOS is prepended when the tokenizer has
    one and the template did not write it.
    """
    text, trained_spans, pos = [], [], 0
    for seg, trained in segments:
        if trained:
            trained_spans.append((pos, pos + len(seg)))
        text.append(seg)
        pos += len(seg)
    pieces = "".join(text).split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(image_ids):
        raise TemplateError(f"the rendered conversation has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for "
                            f"{len(image_ids)} images")
    # The string to tokenize, with each image's span in it, and a map back to positions in the rendered text.
    full, image_spans, shift, shifts = pieces[0], [], 0, []  # shifts: (start in full, offset to subtract)
    inserted_spans = []  # each image's tokens with the text around them: never trained
    # An image's ids as text: special / added tokens as themselves, any other id (Idefics3's newlines between tile
    # rows) as the text it decodes to (a byte-level token's name is not its text: "Ċ" for a newline).
    added = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    for k, piece in enumerate(pieces[1:]):
        written = "".join(tokenizer.convert_ids_to_tokens(i) if i in added else tokenizer.decode([i])
                          for i in image_ids[k])
        inserted = around[0] + written + around[1]
        start = len(full) + len(around[0])
        image_spans.append((start, start + len(written)))
        inserted_spans.append((len(full), len(full) + len(inserted)))
        shifts.append((len(full) + len(inserted), shift + len(inserted) - len(IMAGE_PLACEHOLDER)))
        shift += len(inserted) - len(IMAGE_PLACEHOLDER)
        full += inserted + piece
    ids, offsets = (_tokenize_chunks if chunks else _tokenize_whole)(full, image_spans, image_ids, tokenizer)

    def original(e: int) -> int:  # a position in ``full`` -> the same position in the rendered text
        return e - next((d for start, d in reversed(shifts) if e >= start), 0)

    labels = []
    for t, (s, e) in zip(ids, offsets):
        # image tokens, and tokens that take in text written around an image, never train
        in_image = any(a <= s and e <= b for a, b in image_spans) or any(a < e and s < b for a, b in inserted_spans)
        o = original(e)
        labels.append(t if not in_image and any(a < o <= b for a, b in trained_spans) else IGNORE)
    bos = tokenizer.bos_token_id
    if bos is not None and not (ids and ids[0] == bos):
        ids, labels = [bos] + ids, [IGNORE] + labels
    return {"input_ids": ids, "labels": labels}


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise TemplateError("the tokenizer gives no character offsets (a slow tokenizer); use the checkpoint's "
                            "fast tokenizer (tokenizer.json)") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _tokenize_whole(full: str, image_spans: list[tuple[int, int]], image_ids: list[list[int]], tokenizer):
    """The one-string rule: ``full`` (images written as their tokens' text) tokenized at once; (ids, offsets)."""
    ids, offsets = _offsets(tokenizer, full)
    for k, (a, b) in enumerate(image_spans):  # the image's tokens must come out as themselves
        got = [t for t, (s, e) in zip(ids, offsets) if a <= s and e <= b and e > s]
        if got != list(image_ids[k]):
            raise TemplateError(f"image {k}'s tokens do not survive tokenization as text (is the image token a "
                                "special token of the tokenizer?)")
    return ids, offsets


def _tokenize_chunks(full: str, image_spans: list[tuple[int, int]], image_ids: list[list[int]], tokenizer):
    """LLaVA's rule (tokenizer_image_token): each text chunk between images tokenized on its own, the images' ids
    placed between them as they are; offsets into ``full`` (an image's ids all carry its span)."""
    ids, offsets, pos = [], [], 0
    for k, (a, b) in enumerate([*image_spans, (len(full), len(full))]):
        chunk_ids, chunk_offsets = _offsets(tokenizer, full[pos:a]) if a > pos else ([], [])
        ids += chunk_ids
        offsets += [(s + pos, e + pos) for s, e in chunk_offsets]
        if k < len(image_spans):
            ids += list(image_ids[k])
            offsets += [(a, b)] * len(image_ids[k])
        pos = b
    return ids, offsets
