"""A real transformers tokenizer whose ids can be written by hand: one id per whitespace-separated word.

Built with the `tokenizers` library (WordLevel model, whitespace split) and wrapped in
PreTrainedTokenizerFast, so special tokens written in text (``</s>``, ``<|im_end|>`` ...) are matched the way a
real tokenizer matches them. Unknown words map to <unk> (id 0).
"""
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>",
           "<|im_start|>", "<|im_end|>"]


def word_tokenizer(words: str, bos: str | None = "<s>", eos: str = "</s>", chat_template: str | None = None):
    """Ids: the SPECIAL tokens in order (0..15), then ``words`` (split on whitespace) from 16 on."""
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in words.split():
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token=bos, eos_token=eos,
                                  pad_token="<pad>", additional_special_tokens=SPECIAL[4:])
    if chat_template:
        tok.chat_template = chat_template
    return tok
