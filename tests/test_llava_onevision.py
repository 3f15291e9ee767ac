"""LLaVA-OneVision on a tiny random checkpoint written by transformers' own classes (helpers/llava_onevision.py):
prepared ids and pixels equal what LlavaOnevisionProcessor's own methods make (a lone image tiled, each image of a
multi-image sample one padded tile), the model's loss on our 4-D batch equals its loss on the processor's 5-D batch,
padded batches, packing and the masked dummy change no loss, refusals. The 2-rank ZeRO-3 run is in
test_train_distributed.py, the resume in test_resume.py, the FLOP model in test_flops.py."""
import json
import os

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from conftest import assert_dummy_changes_no_generation
from helpers import family_data, llava_onevision
from lvlm_region.data import prepare
from lvlm_region.model.families.llava_onevision import counter
from lvlm_region.model.loss import token_loss_sum


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return llava_onevision.build(str(tmp_path_factory.mktemp("llava_onevision") / "ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return family_data.write(tmp_path_factory.mktemp("llava_onevision_data"), llava_onevision.SIZES)


def processor_path(proc, tok, sample: dict, folder: str) -> dict:
    """What LlavaOnevisionProcessor.__call__ makes of one sample: the image processor on its images as one nested
    list, each <image> replaced by ``replace_image_token``'s text (both in ``_process_images``), then the tokenizer."""
    names = sample.get("image") or []
    names = [names] if isinstance(names, str) else names
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in sample["conversations"]]
    text = tok.apply_chat_template(messages, tokenize=False)[:-1]  # the last newline never trains
    out = {}
    if names:
        images = [[Image.open(os.path.join(folder, n)).convert("RGB") for n in names]]
        out, replacements = proc._process_images(images, return_tensors="pt")
        pieces = text.split("<image>")
        text = pieces[0] + "".join(r + p for r, p in zip(replacements, pieces[1:]))
    return {"input_ids": tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"], **out}


def test_prepared_ids_and_pixels_are_what_llava_onevision_processor_makes(ckpt, data):
    layout, tok, ds = family_data.items(ckpt, data)
    proc = llava_onevision.processor()
    path, folder = data
    samples = json.loads(open(path).read())
    counts = set()
    for i, sample in enumerate(samples):
        want = processor_path(proc, tok, sample, folder)
        item = ds[i]
        assert item["input_ids"].tolist() == want["input_ids"][0].tolist(), sample["id"]
        if "pixel_values" not in want:
            assert "pixel_values" not in item
            continue
        n = int(want["batch_num_images"][0])
        tiles = 1 if n > 1 else want["pixel_values"].shape[1]  # the model's own slicing of the padded 5-D batch
        assert torch.equal(item["pixel_values"], want["pixel_values"][:, :tiles].flatten(0, 1))
        assert torch.equal(item["image_sizes"], want["image_sizes"]) and item["batch_num_images"].tolist() == [n]
        counts.add((n, int((item["input_ids"] == layout.image_token_id).sum())))
    # a lone image's count follows its size (tiles, unpadding, anyres_max_2's interpolation); two images: 2 x (4 + 1)
    assert {c for n, c in counts if n == 2} == {10} and len({c for n, c in counts if n == 1}) >= 2
    # 100x100: 2x2 tiles, 4x4 features interpolated to 2x2 (anyres_max_2), 2 newlines, the base tile's 4: 10, not 24
    assert len(layout.token_ids((100, 100))) == 10
    nine = counter(layout.processor.image_processor,
                   {**llava_onevision.SETTINGS, "vision_aspect_ratio": "anyres_max_9"})
    assert nine.replace_image_token({"batch_num_images": [1], "image_sizes": [[100, 100]],
                                     "pixel_values": [torch.empty(1, 3, 28, 28)]}, 0).count("<image>") == 24
    assert [len(x) for x in layout.sample_token_ids([(100, 100), (20, 20)])] == [5, 5]


def test_the_models_loss_on_our_batch_equals_its_loss_on_the_processors_batch(ckpt, data):
    """The model slices the processor's padded [images, max tiles, ...] pixels itself with batch_num_images; ours are
    sliced at load time. A multi-image sample (two images, one tile each) and a single image of 4 tiles whose features
    are interpolated (anyres_max_2), in one batch with a text-only sample: the same summed loss."""
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    layout, tok, ds = family_data.items(ckpt, data)
    path, folder = data
    samples = json.loads(open(path).read())
    proc = llava_onevision.processor()
    loss = family_data.loss_of(model, layout, tok)
    for i in (1, 2, 4):  # one 100x100 image (2x2 tiles, interpolated), two images, one 200x30 image
        want = processor_path(proc, tok, samples[i], folder)
        ids = want.pop("input_ids")
        labels = ds[i]["labels"][None]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **want).logits
        assert float(token_loss_sum(logits, labels)) == pytest.approx(loss([ds[i]]), rel=1e-5)
    text, one, two = ds[0], ds[1], ds[2]
    assert loss([text, one, two]) == pytest.approx(loss([text]) + loss([one]) + loss([two]), rel=1e-5)
    family_data.assert_packing_matches_padding(model, layout, tok, [one, text, two])
    dummy = layout.dummy()
    assert dummy.tensors["pixel_values"].shape == (3, 3, 28, 28) and dummy.tensors["batch_num_images"].tolist() == [1]
    assert loss([text, ds[3]], dummy) == pytest.approx(loss([text, ds[3]]), rel=1e-6)
    prompt = torch.tensor(tok.apply_chat_template([{"role": "user", "content": "Describe"}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
    assert_dummy_changes_no_generation(model, layout, tok, prompt)


def test_a_processor_config_that_counts_other_tokens_than_the_model_is_refused(tmp_path):
    src = llava_onevision.build(str(tmp_path / "bad"))
    path = os.path.join(src, "processor_config.json")
    config = json.loads(open(path).read())
    config["vision_aspect_ratio"] = "anyres_max_9"
    open(path, "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=r"processor_config.json's .*'vision_aspect_ratio': 'anyres_max_9'.* differ "
                                         r"from what the model computes .*'anyres_max_2'"):
        prepare.for_model(src, "auto", 512)


def test_importance_then_pruning_writes_a_model_that_generates_with_its_cache(ckpt, data, tmp_path):
    assert family_data.check_importance_and_pruning(ckpt, data, tmp_path)["pinned"]["layers"] == []
