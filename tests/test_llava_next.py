"""LLaVA-NeXT on a tiny random checkpoint written by transformers' own classes (helpers/llava_next.py): prepared ids,
pixels and image sizes equal LlavaNextProcessor's, padded batches and the masked dummy change no loss, refusals.
The 2-rank ZeRO-3 run is in test_train_distributed.py, the resume in test_resume.py, the FLOP model in
test_flops.py."""
import json
import os

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import assert_dummy_changes_no_generation
from helpers import family_data, llava_next
from lvlm_region.data import prepare
from lvlm_region.data.images import ImageLoader
from lvlm_region.data.templates import IGNORE

SIZES = [(28, 28), (60, 40), (40, 90), (100, 100), (200, 30), (20, 20)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return llava_next.build(str(tmp_path_factory.mktemp("llava_next") / "ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return family_data.write(tmp_path_factory.mktemp("llava_next_data"), SIZES)


def test_prepared_ids_pixels_and_sizes_are_what_llava_next_processor_makes(ckpt, data, tmp_path):
    enc, tok, processor = prepare.for_model(ckpt, "auto", 512)
    assert type(processor).__name__ == "LlavaNextProcessor"
    load = ImageLoader(processor.image_processor, "square", enc.layout.tensor_keys)
    counts = set()
    for w, h in SIZES:  # the header size's count is the one the processor writes for the decoded image
        Image.new("RGB", (w, h), "red").save(tmp_path / "x.png")
        want = processor(text="<image>", images=[Image.open(tmp_path / "x.png")], return_tensors="pt")
        n = int((want["input_ids"] == enc.layout.image_token_id).sum())
        assert enc.layout.token_ids((w, h)) == [enc.layout.image_token_id] * n
        got = load(str(tmp_path / "x.png"))
        assert torch.equal(got["pixel_values"], want["pixel_values"][0]) and got["pixel_values"].shape[0] in (3, 5)
        assert torch.equal(got["image_sizes"], want["image_sizes"]) and enc.layout.tokens_in(got) == n
        counts.add(n)
    assert len(counts) >= 4  # the count follows each image's shape
    path, folder = data
    ds = prepare.prepare(path, folder, enc, tok, str(tmp_path / "prep"))
    for row, sample in zip(ds, json.loads(open(path).read())):
        names = sample.get("image") or []
        names = [names] if isinstance(names, str) else names
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in sample["conversations"]]
        text = processor.apply_chat_template(messages, tokenize=False)
        assert text.endswith("<|im_end|>\n")
        images = [Image.open(os.path.join(folder, n)).convert("RGB") for n in names] or None
        want = processor(text=text[:-1], images=images, add_special_tokens=False, return_tensors="pt")
        assert row["input_ids"] == want["input_ids"][0].tolist(), sample["id"]
        replies = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE]
        assert tok.convert_ids_to_tokens(trained) == [x for r in replies for x in (r, "<|im_end|>")]


def test_a_processor_that_counts_other_tokens_than_the_model_is_refused(tmp_path):
    src = llava_next.build(str(tmp_path / "bad"))
    path = os.path.join(src, "processor_config.json")
    config = json.loads(open(path).read())
    config["vision_feature_select_strategy"] = "full"
    open(path, "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=r"the processor's .*'vision_feature_select_strategy': 'full'.* differ from "
                                         r"what the model computes .*'default'"):
        prepare.for_model(src, "auto", 512)


def test_padded_batches_and_the_masked_dummy_change_no_loss_or_generated_token(ckpt, data):
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    layout, tok, ds = family_data.items(ckpt, data)
    text, one, two = ds[0], ds[1], ds[2]
    assert "pixel_values" not in text and len(one["image_sizes"]) == 1 and len(two["image_sizes"]) == 2
    loss = family_data.loss_of(model, layout, tok)
    # Right padding, images of other tile counts and token counts in one batch: the losses, summed.
    assert loss([text, one, two]) == pytest.approx(loss([text]) + loss([one]) + loss([two]), rel=1e-5)
    family_data.assert_packing_matches_padding(model, layout, tok, [one, text, two])
    dummy = layout.dummy()
    assert dummy.tensors["pixel_values"].shape == (3, 3, 28, 28) and dummy.tensors["image_sizes"].tolist() == [[28, 28]]
    assert loss([text, ds[3]], dummy) == pytest.approx(loss([text, ds[3]]), rel=1e-6)
    prompt = torch.tensor(tok.apply_chat_template([{"role": "user", "content": "Describe"}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
    assert_dummy_changes_no_generation(model, layout, tok, prompt)
    assert AutoProcessor.from_pretrained(ckpt).image_processor.image_grid_pinpoints == llava_next.PINPOINTS


def test_importance_then_pruning_writes_a_model_that_generates_with_its_cache(ckpt, data, tmp_path):
    assert family_data.check_importance_and_pruning(ckpt, data, tmp_path)["pinned"]["layers"] == []
