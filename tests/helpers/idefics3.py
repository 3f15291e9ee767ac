"""A tiny random Idefics3 (SmolVLM) checkpoint in the real layout, written by transformers' own classes.

config.json (Idefics3Config: a 2-layer vision tower of 32x32 tiles in 8x8 patches, 4 tokens per tile after the pixel
shuffle, a 4-layer Llama LLM), model.safetensors, a byte-level BPE tokenizer trained here (newlines are real tokens,
as in SmolVLM's) with Idefics3's image tokens and row / column tags and a SmolVLM-style chat template, and
Idefics3Processor with the PIL image processor (longest edge 128, tiles of 32: up to 4 x 4 tiles plus the global
image).
"""
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# SmolVLM-Instruct's chat template, written out (string content accepted too): "User:" / "Assistant:" turns ended by
# <end_of_utterance> and a newline; an image part is <image> (the processor expands it).
TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}{% if message['content'] is string %}"
    "{{ ': ' + message['content'] }}{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}"
    "{{ ': ' }}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
           "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
CORPUS = ["User: What color is the shape?", "Assistant: red green blue yellow", "Which shape is it? square circle",
          "Describe the image.", "\n\n\n\n"]
TILE, PATCH = 32, 8
TEXT = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=TILE,
              patch_size=PATCH)


def tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    tok = T.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
                                    bos_token="<|im_start|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[2:]})
    tok.chat_template = TEMPLATE
    return tok


def model(seed: int = 0, tok=None, smolvlm: bool = False):
    """The tiny model as Idefics3, or (``smolvlm``) as SmolVLM2: the same tower, connector and LLM."""
    tok = tok or tokenizer()
    config_cls, model_cls = ((T.SmolVLMConfig, T.SmolVLMForConditionalGeneration) if smolvlm else
                             (T.Idefics3Config, T.Idefics3ForConditionalGeneration))
    config = config_cls(
        text_config=dict(TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id),
        vision_config=VISION, image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return model_cls(config)


def processor(tok=None):
    image_processor = T.Idefics3ImageProcessorPil(size={"longest_edge": 4 * TILE},
                                                  max_image_size={"longest_edge": TILE})
    return T.Idefics3Processor(image_processor, tok or tokenizer(), image_seq_len=(TILE // PATCH) ** 2 // 4,
                               chat_template=TEMPLATE)


def build(out: str, seed: int = 0) -> str:
    """Write a tiny random Idefics3 checkpoint to ``out``; returns ``out``."""
    tok = tokenizer()
    model(seed, tok).save_pretrained(out)
    processor(tok).save_pretrained(out)
    return out


def build_smolvlm(out: str, seed: int = 0) -> str:
    """A tiny random SmolVLM2 checkpoint (the same tower, connector, tokenizer and sizes) in ``out``: SmolVLMProcessor
    needs torchvision, so its tokenizer, image processor and processor_config.json are written one by one, as
    SmolVLMProcessor.save_pretrained writes them."""
    import json
    import os
    tok = tokenizer()
    model(seed, tok, smolvlm=True).save_pretrained(out)
    tok.save_pretrained(out)
    T.SmolVLMImageProcessorPil(size={"longest_edge": 4 * TILE}, max_image_size={"longest_edge": TILE}).save_pretrained(
        out)
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "SmolVLMProcessor", "image_seq_len": (TILE // PATCH) ** 2 // 4}, f)
    return out
