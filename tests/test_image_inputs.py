"""Qwen2-VL / Qwen2.5-VL image inputs (image_inputs.py) on tiny random checkpoints in the real format.

Token counts per image come from the header size (preparation decodes nothing to count); they must be what the
image processor then makes of the decoded image, the model must accept the batches, and the masked dummy image of
a text-only batch must change nothing.
"""
import json
import os
import sys

import pytest
import torch
from PIL import Image

from conftest import assert_dummy_changes_no_generation, run
from helpers import qwen
from lvlm_region.data import prepare
from lvlm_region.data.batches import ImageTextDataset, collate
from lvlm_region.data.images import ImageLoader
from lvlm_region.model.loss import token_loss_sum
from lvlm_region.data.templates import IGNORE


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return qwen.build(str(tmp_path_factory.mktemp("qwen2_vl") / "ckpt"), "qwen2_vl")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_data")
    return qwen.write_data(str(folder), n=12, text_every=3), str(folder)


@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_token_count_from_the_header_is_what_the_processor_makes_of_the_image(ckpt, tmp_path, aspect):
    enc, tok, _ = prepare.for_model(ckpt, "auto", 512, aspect=aspect)
    layout = enc.layout
    load = ImageLoader(qwen.image_processor(), aspect, layout.tensor_keys)
    seen = set()
    for w, h in qwen.SIZES + [(300, 20), (20, 300), (500, 400)]:
        path = str(tmp_path / f"{w}x{h}.png")
        Image.new("RGB", (w, h), "red").save(path)
        ids = layout.token_ids((w, h))
        tensors = load(path)
        t, gh, gw = tensors["image_grid_thw"][0].tolist()
        n = t * gh * gw // 4  # 2 x 2 patches merged into one token
        assert ids == [layout.start_id] + [layout.image_token_id] * n + [layout.end_id]
        assert tok.convert_ids_to_tokens([ids[0], ids[1], ids[-1]]) == ["<|vision_start|>", "<|image_pad|>",
                                                                       "<|vision_end|>"]
        assert tensors["pixel_values"].shape == (t * gh * gw, 3 * 2 * 14 * 14)
        assert layout.tokens_in(tensors) == n
        if aspect == "pad":
            assert gh == gw  # the processor sees the padded square
        seen.add(n)
    assert min(seen) == 4 and max(seen) == 16 and len(seen) >= 3  # min / max pixels bound the count


def test_prepared_samples_wrap_each_image_in_vision_tokens(ckpt, data, tmp_path):
    path, folder = data
    out = tmp_path / "prep"
    res = run([sys.executable, "data_prep/prepare.py", "--data", path, "--model", ckpt, "--output", str(out),
               "--image-aspect-ratio", "square"], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ds, meta = prepare.load_prepared(str(out))
    enc, tok, _ = prepare.for_model(ckpt, "auto", 2048, aspect="square")
    assert meta["identity"]["n_image_tokens"] == "grid" and meta["identity"]["pad_to_square"] is False
    load = ImageLoader(qwen.image_processor(), "square", enc.layout.tensor_keys)
    samples = json.loads(open(path).read())
    assert len(ds) == len(samples) and ds["id"] == [s["id"] for s in samples]
    for row, sample in zip(ds, samples):
        text = tok.convert_ids_to_tokens(row["input_ids"])
        reply = sample["conversations"][-1]["value"]
        assert [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE] == \
            tok.convert_tokens_to_ids([reply, "<|im_end|>"])  # the reply and its end of turn, nothing else
        if "image" not in sample:
            assert row["modality"] == "text" and "<|vision_start|>" not in text
            continue
        grid = load(os.path.join(folder, sample["image"]))["image_grid_thw"][0]
        n = int(grid.prod()) // 4
        start = text.index("<|vision_start|>")
        assert text[start:start + n + 2] == ["<|vision_start|>"] + ["<|image_pad|>"] * n + ["<|vision_end|>"]
        assert text.count("<|image_pad|>") == n
    # A run that pads images to squares gets other token counts: the prepared directory is refused, naming why.
    enc_pad, _, _ = prepare.for_model(ckpt, "auto", 2048, aspect="pad")
    with pytest.raises(ValueError, match=r"pad_to_square: prepared False, this run True"):
        prepare.check_matches(meta, str(out), enc_pad, tok)


def batches(ckpt, data, aspect="square"):
    path, folder = data
    enc, tok, _ = prepare.for_model(ckpt, "auto", 2048, aspect=aspect)
    ds = prepare.prepare(path, folder, enc, tok, os.path.join(folder, f"prepared-{aspect}"))
    load = ImageLoader(qwen.image_processor(), aspect, enc.layout.tensor_keys)
    items = ImageTextDataset(ds, folder, load, enc.layout)
    return enc.layout, tok, items


def test_padded_batches_and_the_masked_dummy_change_no_loss(ckpt, data):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    layout, tok, items = batches(ckpt, data)
    image_a, image_b, text = items[0], items[1], items[2]
    assert "pixel_values" in image_a and "pixel_values" not in text
    assert len(image_a["input_ids"]) != len(image_b["input_ids"])  # different image sizes, different lengths

    def loss(samples, dummy=None):
        b = collate(samples, tok.pad_token_id, dummy=dummy)
        with torch.no_grad():
            return float(token_loss_sum(model(**layout.model_inputs(b)).logits, b["labels"]))

    # Right padding and two images of different grids in one batch: the per-sample losses, summed.
    alone = loss([image_a]) + loss([image_b]) + loss([text])
    assert loss([image_a, image_b, text]) == pytest.approx(alone, rel=1e-5)
    # A text-only batch: the masked dummy image changes nothing (and 3-D positions skip it).
    dummy = layout.dummy()
    b = collate([text, items[5]], tok.pad_token_id, dummy=dummy)
    assert b["image_grid_thw"].tolist() == [[1, 4, 4]] and b["real_images"] == 0
    assert b["input_ids"][0, -len(dummy.ids):].tolist() == list(dummy.ids)
    assert loss([text, items[5]], dummy) == pytest.approx(loss([text, items[5]]), rel=1e-6)

    # Generation from a left-padded text-only batch: the dummy in front changes no token or score.
    prompt = torch.tensor(tok.apply_chat_template([{"role": "user", "content": "Describe red"}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
    assert_dummy_changes_no_generation(model, layout, tok, prompt)


def test_an_image_resized_after_preparation_is_replaced_not_fed_with_wrong_tokens(ckpt, data, tmp_path):
    path, folder = data
    layout, tok, items = batches(ckpt, data)
    first = json.loads(open(path).read())[0]
    image = os.path.join(folder, first["image"])
    original = open(image, "rb").read()
    try:
        Image.new("RGB", (112, 112), "red").save(image)  # now 16 tokens, not the 6 prepared
        item = items[0]
        assert item["replaced"] == 1 and item["input_ids"].tolist() == items.ds[1]["input_ids"]
    finally:
        open(image, "wb").write(original)
    assert items[0]["replaced"] == 0


def test_a_processor_template_in_chat_template_json_is_used_and_exported(ckpt, tmp_path):
    """Older Qwen2-VL checkpoints keep the template in chat_template.json (the processor's file)."""
    import shutil

    from lvlm_region.model.families.qwen2_vl import SplitProcessor
    src = tmp_path / "legacy"
    shutil.copytree(ckpt, src)
    os.remove(src / "chat_template.jinja")
    (src / "chat_template.json").write_text(json.dumps({"chat_template": qwen.QWEN_TEMPLATE}))
    enc, tok, processor = prepare.for_model(str(src), "auto", 512)
    assert isinstance(processor, SplitProcessor) and enc.template.source == qwen.QWEN_TEMPLATE
    assert tok.chat_template is None  # the template came from the processor's file
    out = tmp_path / "export"
    processor.save_pretrained(str(out))
    from transformers import AutoImageProcessor, AutoTokenizer
    assert AutoTokenizer.from_pretrained(out).chat_template == qwen.QWEN_TEMPLATE
    assert AutoImageProcessor.from_pretrained(out).to_dict() == AutoImageProcessor.from_pretrained(src).to_dict()


def test_packing_is_refused_for_qwen_before_weights_load(ckpt, data, tmp_path):
    res = run([sys.executable, "launch/sft.py", "--model", ckpt, "--data", data[0], "--packing", "--output-dir",
               str(tmp_path / "out")], timeout=300)
    assert res.returncode == 2
    assert "--packing: qwen2_vl computes its own 3-D rotary positions per sample" in res.stderr
    assert "train it without --packing" in res.stderr and "Loading weights" not in res.stdout + res.stderr


def test_an_image_qwen_cannot_resize_is_dropped_with_its_reason(ckpt, tmp_path):
    Image.new("RGB", (2000, 8), "red").save(tmp_path / "strip.png")  # 250:1; smart_resize refuses beyond 200:1
    Image.new("RGB", (60, 40), "red").save(tmp_path / "ok.png")
    samples = [{"id": name, "image": f"{name}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]}
        for name in ("strip", "ok")]
    (tmp_path / "d.json").write_text(json.dumps(samples))
    enc, tok, _ = prepare.for_model(ckpt, "auto", 512, aspect="square")
    ds = prepare.prepare(str(tmp_path / "d.json"), str(tmp_path), enc, tok, str(tmp_path / "p"), max_bad_fraction=1.0)
    assert ds["id"] == ["ok"]
    report = json.loads((tmp_path / "p" / prepare.REPORT).read_text())
    assert report["dropped_by_reason"] == {"image_aspect_ratio": 1}
    detail = report["dropped_samples"][0]["detail"]
    assert "strip.png is 2000x8" in detail and "aspect ratio must be smaller than 200" in detail


def test_a_hub_style_preprocessor_config_counts_the_same(ckpt, tmp_path):
    """Qwen2-VL checkpoints on the hub keep min_pixels / max_pixels at the top level of preprocessor_config.json
    (users lower max_pixels there); the count from the header must follow them as the processor does."""
    import shutil

    from transformers import AutoImageProcessor
    src = tmp_path / "hub"
    shutil.copytree(ckpt, src)
    (src / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 28 * 28 * 30, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}))
    enc, _, _ = prepare.for_model(str(src), "auto", 512, aspect="square")
    load = ImageLoader(AutoImageProcessor.from_pretrained(src), "square", enc.layout.tensor_keys)
    counts = []
    for w, h in [(60, 40), (300, 200), (1000, 700), (90, 1400)]:
        Image.new("RGB", (w, h), "blue").save(tmp_path / "x.png")
        tensors = load(str(tmp_path / "x.png"))
        counts.append(enc.layout.tokens_in(tensors))
        assert len(enc.layout.token_ids((w, h))) - 2 == counts[-1]
    assert max(counts) <= 30 and counts[0] < counts[-1]  # max_pixels (30 tokens) caps the large ones


def test_qwen_keeps_the_aspect_ratio_by_default(ckpt, tmp_path):
    """Padding a Qwen2-VL image to a square only adds tokens, so its default is square in both stages (Llava keeps
    LLaVA-1.5's: square for stage 1, pad for SFT); data_prep's default follows the same rule."""
    from lvlm_region.train.cli import parse
    for stage in ("pretrain", "sft"):
        flags = ["--model", ckpt, "--data", "d.json", "--output-dir", str(tmp_path)]
        assert parse(stage, "", flags).resolve().image_aspect_ratio == "square"
    assert parse("sft", "", ["--output-dir", str(tmp_path)]).resolve().image_aspect_ratio == "pad"  # the demo Llava
    assert parse("pretrain", "", ["--output-dir", str(tmp_path)]).resolve().image_aspect_ratio == "square"
    enc, _, _ = prepare.for_model(ckpt, "auto", 512)
    assert enc.layout.pad is False
