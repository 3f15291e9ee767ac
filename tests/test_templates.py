"""Label masks of every template, pinned by hand on a word-level tokenizer (one id per word).

Expected sequences are written out token by token; [brackets] mark the tokens the loss is taken on.
"""
import pytest

from helpers.word_tokenizer import word_tokenizer
from lvlm_region.data.templates import (BUILTIN, IGNORE, VICUNA_SYSTEM, ChatFormat, TemplateError, end_of_turn_id,
                                   resolve, tokenize)

WORDS = "USER: ASSISTANT: Q1 Q2 A1 A2 A3 SYS user assistant system You are a helpful assistant. " + VICUNA_SYSTEM
IMG = 4  # "<image>" in the word tokenizer
N_IMG = 2

A = [{"role": "user", "content": "<image>\nQ1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2 A3"}]
B = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
C = [{"role": "user", "content": "Q1\n<image>"}, {"role": "assistant", "content": "A1"}]
D = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "<image>\nQ2"}, {"role": "assistant", "content": "A2"},
     {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A3"}]  # image in a later turn

# Real-world chat templates, as their tokenizers ship them (Qwen2 adds a default system turn; Phi-3 ends a
# conversation with eos, which is not part of the last reply).
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

S = VICUNA_SYSTEM
CHATML_D = ("<|im_start|> user Q1 <|im_end|> <|im_start|> assistant [A1 <|im_end|>] <|im_start|> user <image> <image> "
            "Q2 <|im_end|> <|im_start|> assistant [A2 <|im_end|>] <|im_start|> user Q1 <|im_end|> <|im_start|> "
            "assistant [A3 <|im_end|>]")
PHI3_D = ("<s> <|user|> Q1 <|end|> <|assistant|> [A1 <|end|>] <|user|> <image> <image> Q2 <|end|> <|assistant|> "
          "[A2 <|end|>] <|user|> Q1 <|end|> <|assistant|> [A3 <|end|>]")
CASES = [
    ("plain", {}, D, "<s> [A1] <image> <image> [A2] [A3]"),
    ("vicuna_v1", {}, D, f"<s> {S} USER: Q1 ASSISTANT: [A1 </s>] USER: <image> <image> Q2 ASSISTANT: [A2 </s>] "
                         "USER: Q1 ASSISTANT: [A3 </s>]"),
    ("llama3", {}, D, "<s> <|start_header_id|> user <|end_header_id|> Q1 <|eot_id|> <|start_header_id|> assistant "
                      "<|end_header_id|> [A1 <|eot_id|>] <|start_header_id|> user <|end_header_id|> <image> <image> Q2 "
                      "<|eot_id|> <|start_header_id|> assistant <|end_header_id|> [A2 <|eot_id|>] <|start_header_id|> "
                      "user <|end_header_id|> Q1 <|eot_id|> <|start_header_id|> assistant <|end_header_id|> "
                      "[A3 <|eot_id|>]"),
    ("phi3", {}, D, PHI3_D),
    ("chatml", {"bos": None}, D, CHATML_D),
    ("auto", {"bos": None, "chat_template": QWEN2}, D,
     "<|im_start|> system You are a helpful assistant. <|im_end|> " + CHATML_D),
    ("auto", {"chat_template": PHI3, "eos": "<|endoftext|>"}, D, PHI3_D),
    ("plain", {}, A, "<s> <image> <image> [A1] [A2 A3]"),
    ("plain", {}, C, "<s> <image> <image> [A1]"),
    ("vicuna_v1", {}, A, f"<s> {S} USER: <image> <image> Q1 ASSISTANT: [A1 </s>] USER: Q2 ASSISTANT: [A2 A3 </s>]"),
    ("vicuna_v1", {}, B, "<s> SYS USER: Q1 ASSISTANT: [A1 </s>]"),
    ("vicuna_v1", {}, C, f"<s> {S} USER: Q1 <image> <image> ASSISTANT: [A1 </s>]"),
    ("llama3", {}, A, "<s> <|start_header_id|> user <|end_header_id|> <image> <image> Q1 <|eot_id|> "
                      "<|start_header_id|> assistant <|end_header_id|> [A1 <|eot_id|>] <|start_header_id|> user "
                      "<|end_header_id|> Q2 <|eot_id|> <|start_header_id|> assistant <|end_header_id|> [A2 A3 <|eot_id|>]"),
    ("llama3", {}, B, "<s> <|start_header_id|> system <|end_header_id|> SYS <|eot_id|> <|start_header_id|> user "
                      "<|end_header_id|> Q1 <|eot_id|> <|start_header_id|> assistant <|end_header_id|> [A1 <|eot_id|>]"),
    ("phi3", {}, A, "<s> <|user|> <image> <image> Q1 <|end|> <|assistant|> [A1 <|end|>] <|user|> Q2 <|end|> "
                    "<|assistant|> [A2 A3 <|end|>]"),
    ("phi3", {}, B, "<s> <|system|> SYS <|end|> <|user|> Q1 <|end|> <|assistant|> [A1 <|end|>]"),
    ("chatml", {"bos": None}, A, "<|im_start|> user <image> <image> Q1 <|im_end|> <|im_start|> assistant "
                                 "[A1 <|im_end|>] <|im_start|> user Q2 <|im_end|> <|im_start|> assistant [A2 A3 <|im_end|>]"),
    ("chatml", {"bos": None}, B, "<|im_start|> system SYS <|im_end|> <|im_start|> user Q1 <|im_end|> <|im_start|> "
                                 "assistant [A1 <|im_end|>]"),
    ("auto", {"bos": None, "chat_template": QWEN2}, A,
     "<|im_start|> system You are a helpful assistant. <|im_end|> <|im_start|> user <image> <image> Q1 <|im_end|> "
     "<|im_start|> assistant [A1 <|im_end|>] <|im_start|> user Q2 <|im_end|> <|im_start|> assistant [A2 A3 <|im_end|>]"),
    ("auto", {"bos": None, "chat_template": QWEN2}, B,
     "<|im_start|> system SYS <|im_end|> <|im_start|> user Q1 <|im_end|> <|im_start|> assistant [A1 <|im_end|>]"),
    ("auto", {"chat_template": PHI3, "eos": "<|endoftext|>"}, A,
     "<s> <|user|> <image> <image> Q1 <|end|> <|assistant|> [A1 <|end|>] <|user|> Q2 <|end|> <|assistant|> "
     "[A2 A3 <|end|>]"),
]


def expected(spec: str) -> tuple[list[str], list[bool]]:
    tokens, trained, inside = [], [], False
    for w in spec.split():
        if w.startswith("["):
            inside, w = True, w[1:]
        close = w.endswith("]")
        tokens.append(w.rstrip("]") if close else w)
        trained.append(inside)
        if close:
            inside = False
    return tokens, trained


@pytest.mark.parametrize("name,tok_kwargs,conv,spec", CASES)
def test_label_mask(name, tok_kwargs, conv, spec):
    tok = word_tokenizer(WORDS, **tok_kwargs)
    fmt = resolve(name, tok, "the test tokenizer")
    out = tokenize(fmt.segments(tok, conv), tok, [[IMG] * N_IMG] * sum(m['content'].count('<image>') for m in conv),
                   chunks=fmt.image_chunks)
    tokens, trained = expected(spec)
    assert tok.convert_ids_to_tokens(out["input_ids"]) == tokens
    assert out["labels"] == [i if t else IGNORE for i, t in zip(out["input_ids"], trained)]


def test_vicuna_renders_llava_15_text_exactly():
    tok = word_tokenizer(WORDS)
    fmt = resolve("vicuna_v1", tok, "t")
    assert fmt.render(tok, A) == f"{S} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2 A3</s>"
    assert fmt.prompt(tok, A[:3]) == f"{S} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"


@pytest.mark.parametrize("name,stop", [("vicuna_v1", "</s>"), ("llama3", "<|eot_id|>"), ("phi3", "<|end|>"),
                                       ("chatml", "<|im_end|>")])
def test_generation_stops_at_the_end_of_turn_token(name, stop):
    tok = word_tokenizer(WORDS)
    assert tok.convert_ids_to_tokens(end_of_turn_id(resolve(name, tok, "t"), tok)) == stop


def test_auto_without_a_chat_template_names_the_fix():
    with pytest.raises(ValueError, match=r"the tokenizer of --llm /ckpt/vicuna has no chat template .* pass "
                                         r"--template .*vicuna_v1"):
        resolve("auto", word_tokenizer(WORDS), "--llm /ckpt/vicuna")


def test_builtin_template_needs_its_special_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(ValueError, match=r"--template chatml writes the special tokens \['<\|im_start\|>', "
                                         r"'<\|im_end\|>'\], which the tokenizer of M does not have"):
        resolve("chatml", tok, "M")


def test_a_template_that_never_ends_a_reply_is_refused():
    # llava-hf's processor template: replies end in a space, no eos; the model would never learn to stop.
    no_eos = ("{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}{% if c['type'] == "
              "'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    tok = word_tokenizer(WORDS)
    with pytest.raises(ValueError, match=r"the chat template of M ends a reply without an end-of-turn token"):
        resolve("auto", tok, "M", processor_template=no_eos)


def test_typed_content_processor_template_is_used_when_the_tokenizer_has_none():
    typed = ("{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}{% if c['type'] == "
             "'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' ' if m['role'] == "
             "'user' else eos_token }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    tok = word_tokenizer(WORDS)
    fmt = resolve("auto", tok, "M", processor_template=typed)
    assert fmt.typed_content
    out = tokenize(fmt.segments(tok, C), tok, [[IMG] * N_IMG])
    tokens, trained = expected("<s> USER: Q1 <image> <image> ASSISTANT: [A1 </s>]")
    assert tok.convert_ids_to_tokens(out["input_ids"]) == tokens
    assert out["labels"] == [i if t else IGNORE for i, t in zip(out["input_ids"], trained)]


def test_a_template_that_is_not_prefix_consistent_is_refused():
    # Renders only the last user turn: earlier turns vanish from longer conversations.
    odd = ("{% for m in messages %}{% if m['role'] == 'assistant' or loop.last %}{{ m['role'] }}: {{ m['content'] }}"
           "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tok = word_tokenizer(WORDS)
    fmt = ChatFormat("auto", odd)
    with pytest.raises(TemplateError, match="does not render conversations prefix by prefix"):
        fmt.segments(tok, A)


def test_builtin_sources_are_distinct():
    assert len({BUILTIN[n] for n in BUILTIN}) == len(BUILTIN)


def test_a_generation_prompt_that_the_conversation_does_not_contain_is_refused():
    # As Qwen3 without thinking: the generation prompt adds an empty think block that rendered replies lack, so
    # the reply's start cannot be located in the conversation.
    odd = QWEN2.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\n<think></think>' }}")
    tok = word_tokenizer(WORDS, bos=None)
    with pytest.raises(TemplateError, match="does not render conversations prefix by prefix"):
        ChatFormat("auto", odd).segments(tok, A)


def test_vicuna_system_prompt_is_llava_15s():
    # LLaVA's conv_vicuna_v1 (llava/conversation.py), which LLaVA-1.5 trains (--version v1) and evaluates
    # (--conv-mode vicuna_v1) with; conv_llava_v1's "curious human" text is not it.
    assert VICUNA_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                             "gives helpful, detailed, and polite answers to the user's questions.")


def _sentencepiece(tmp_path):
    """A real sentencepiece BPE model (Llama-style: '▁' word starts, byte fallback) trained on a small corpus."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([VICUNA_SYSTEM, "USER: ASSISTANT: what colour is the shape? red blue square",
                                 "where is it? top left bottom right circle"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True,
                                   user_defined_symbols=["<image>"], hard_vocab_limit=False, minloglevel=2)
    d = tmp_path / "sp_tok"
    d.mkdir()
    (tmp_path / "sp.model").rename(d / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(d))
    tok.add_bos_token = True  # as Vicuna's and Llama-2's tokenizer_config.json have it
    return tok


def _byte_level_bpe():
    """A real byte-level BPE tokenizer (GPT-2 / Qwen / Llama-3 style) trained on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([VICUNA_SYSTEM, "USER: ASSISTANT: what colour is the shape? red blue square",
                                 "where is it? top left bottom right circle"] * 20,
                                trainers.BpeTrainer(vocab_size=300,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                    special_tokens=["<|endoftext|>", "<image>", "<|im_start|>",
                                                                    "<|im_end|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<image>", "<|im_start|>"])


MULTI = [{"role": "user", "content": "<image>\nwhat colour is the shape?"}, {"role": "assistant", "content": "red"},
         {"role": "user", "content": "where is it?"}, {"role": "assistant", "content": "top left"},
         {"role": "user", "content": "and the shape?"}, {"role": "assistant", "content": "square"}]


@pytest.mark.parametrize("kind,source", [("sentencepiece", "vicuna_v1"), ("bpe", "chatml"), ("bpe", "vicuna_v1")])
def test_a_tokenizers_own_template_gives_the_ids_of_the_rendered_conversation_as_one_string(tmp_path, kind, source):
    """--template auto (the tokenizer's or processor's own template): ids as the processor makes them at inference,
    the rendered conversation tokenized as one string."""
    tok = _sentencepiece(tmp_path) if kind == "sentencepiece" else _byte_level_bpe()
    tok.chat_template = BUILTIN[source]  # a released chat model carrying this format as its own
    fmt = resolve("auto", tok, "t")
    assert not fmt.image_chunks
    image = tok.convert_tokens_to_ids("<image>")
    segments = fmt.segments(tok, MULTI)
    out = tokenize(segments, tok, [[image] * 3], chunks=fmt.image_chunks)
    text = "".join(t for t, _ in segments).replace("<image>", "<image>" * 3)  # the processor's expansion
    one = tok(text, add_special_tokens=False)["input_ids"]
    lead = [tok.bos_token_id] if tok.bos_token_id is not None and one[:1] != [tok.bos_token_id] else []
    assert out["input_ids"] == lead + one
    if kind == "sentencepiece":  # the old per-segment tokenization added a '▁' per turn
        pieces = tok.convert_ids_to_tokens(out["input_ids"])
        assert pieces.count("▁") == tok.convert_ids_to_tokens(lead + one).count("▁")
    # What training sees before each reply is what inference tokenizes as the prompt (evaluate.PromptDataset).
    for i in (1, 3, 5):
        prompt = tokenize([(fmt.prompt(tok, MULTI[:i]), False)], tok, [[image] * 3])["input_ids"]
        assert out["input_ids"][:len(prompt)] == prompt
        assert out["labels"][len(prompt) - 1] == IGNORE and out["labels"][len(prompt)] != IGNORE  # the reply trains
        if i == 1:
            assert all(x == IGNORE for x in out["labels"][:len(prompt)])
    trained = tok.decode([t for t in out["labels"] if t != IGNORE])
    assert all(m["content"] in trained for m in MULTI if m["role"] == "assistant")


# LLaVA's own code (haotian-liu/LLaVA: llava/mm_utils.py tokenizer_image_token, llava/conversation.py conv_vicuna_v1
# and conv_llava_plain, llava/train/train.py preprocess_plain), written out: what LLaVA-1.5 was trained and is
# evaluated with. IMAGE_TOKEN_INDEX stands for the image; our ids expand it to the image's tokens.
IMAGE_TOKEN_INDEX = -200


def llava_tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def llava_v1_prompt(messages: list[dict], eos: str, generation: bool = False) -> str:
    """conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO, sep ' ', sep2 '</s>': the eos of the Llama tokenizers LLaVA
    ships with; ``eos`` here, so the byte-level tokenizer's end of turn is its own eos, as our template writes it)."""
    seps, ret = [" ", eos], VICUNA_SYSTEM + " "
    for i, m in enumerate(messages):
        ret += ("USER" if m["role"] == "user" else "ASSISTANT") + ": " + m["content"] + seps[i % 2]
    return ret + ("ASSISTANT:" if generation else "")


def collapse(ids: list[int], image: int) -> list[int]:
    """Each run of an image's tokens as LLaVA's one IMAGE_TOKEN_INDEX."""
    out = []
    for i in ids:
        if i == image:
            if out[-1:] != [IMAGE_TOKEN_INDEX]:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(i)
    return out


CAPTION = [{"role": "user", "content": "<image>\nDescribe the image."},
           {"role": "assistant", "content": "a red circle top left"}]


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_llava_templates_give_llavas_own_ids_in_training_and_evaluation(tmp_path, kind):
    """vicuna_v1 and plain tokenize as LLaVA's tokenizer_image_token does: the text after each image on its own, so a
    sentencepiece tokenizer writes its '▁' right after the image (Vicuna's 29871 before the '\\n'), as LLaVA-1.5
    checkpoints were trained with; tokenizing the whole prompt as one string (the earlier rule) does not."""
    tok = _sentencepiece(tmp_path) if kind == "sentencepiece" else _byte_level_bpe()
    image = tok.convert_tokens_to_ids("<image>")
    vicuna, plain = resolve("vicuna_v1", tok, "t"), resolve("plain", tok, "t")
    assert vicuna.image_chunks and plain.image_chunks
    ours = tokenize(vicuna.segments(tok, MULTI), tok, [[image] * 3], chunks=True)
    assert collapse(ours["input_ids"], image) == llava_tokenizer_image_token(llava_v1_prompt(MULTI, tok.eos_token), tok)
    for i in (1, 3, 5):  # the evaluation prompt, as LLaVA's model_vqa builds and tokenizes it
        prompt = tokenize([(vicuna.prompt(tok, MULTI[:i]), False)], tok, [[image] * 3], chunks=True)["input_ids"]
        assert collapse(prompt, image) == llava_tokenizer_image_token(llava_v1_prompt(MULTI[:i], tok.eos_token, True), tok)
    # stage 1: preprocess_plain's DEFAULT_IMAGE_TOKEN + caption + conv_llava_plain.sep ("\n"), all of it trained
    cap = tokenize(plain.segments(tok, CAPTION), tok, [[image] * 3], chunks=True)
    assert collapse(cap["input_ids"], image) == llava_tokenizer_image_token("<image>a red circle top left\n", tok)
    trained = [t for t in cap["labels"] if t != IGNORE]
    assert trained == cap["input_ids"][-len(trained):] and tok.decode(trained).strip() == "a red circle top left"
    assert tok.decode(trained).endswith("\n")  # the separator ends the caption and trains
    if kind == "sentencepiece":  # the token the one-string rule lost
        after = ours["input_ids"][ours["input_ids"].index(image) + 3]
        assert tok.convert_ids_to_tokens(after) == "▁"
        one = tokenize(vicuna.segments(tok, MULTI), tok, [[image] * 3], chunks=False)["input_ids"]
        assert len(one) == len(ours["input_ids"]) - 1
