"""InternVL on a tiny random checkpoint written by transformers' own classes (helpers/internvl.py): tile counts,
ids and pixel tensors as InternVLProcessor makes them, padded batches and the masked dummy change no loss,
importance and pruning. The 2-rank ZeRO-3 run is in test_train_distributed.py, the resume in test_resume.py, the FLOP
model in test_flops.py.

InternVLProcessor itself cannot be constructed here (its video processor needs torchvision), so the expected ids are
built as its ``__call__`` builds them: the chat template's text with ``<IMG_CONTEXT>`` per image, each replaced by
``<img>`` + ``image_seq_length`` x ``num_patches`` ``<IMG_CONTEXT>`` + ``</img>`` (its ``replace_image_token``, with
the tile count the image processor reports for the decoded image under the processor's ``crop_to_patches=True``),
then the tokenizer."""
import json
import os

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from conftest import assert_dummy_changes_no_generation
from helpers import internvl, family_data
from lvlm_region.data import prepare
from lvlm_region.data.images import ImageLoader

SIZES = [(32, 32), (64, 32), (100, 50), (30, 90), (200, 70), (20, 20)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return internvl.build(str(tmp_path_factory.mktemp("internvl") / "ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return family_data.write(tmp_path_factory.mktemp("internvl_data"), SIZES)


def test_tiles_ids_and_pixels_are_what_internvl_processor_makes(ckpt, data, tmp_path):
    enc, tok, processor = prepare.for_model(ckpt, "auto", 512)
    layout, ip = enc.layout, internvl.image_processor()
    assert processor.image_processor.crop_to_patches and not ip.crop_to_patches  # as the processor calls it
    seen = set()
    load = ImageLoader(processor.image_processor, "square")
    for w, h in SIZES + [(300, 20)]:
        Image.new("RGB", (w, h), "red").save(tmp_path / "x.png")
        want = ip(images=[Image.open(tmp_path / "x.png")], crop_to_patches=True, return_tensors="pt")
        tiles = int(want["num_patches"][0])
        assert layout.token_ids((w, h)) == [layout.start_id] + [layout.image_token_id] * 4 * tiles + [layout.end_id]
        got = load(str(tmp_path / "x.png"))
        assert torch.equal(got["pixel_values"], want["pixel_values"]) and layout.tokens_in(got) == 4 * tiles
        seen.add(tiles)
    assert seen == {1, 3, 4, 5}  # one tile, or 2-4 tiles plus the thumbnail
    path, folder = data
    ds = prepare.prepare(path, folder, enc, tok, str(tmp_path / "prep"))

    def expand(image):  # InternVLProcessor.replace_image_token, with the tile count it gets for the image
        tiles = int(ip(images=[image], crop_to_patches=True)["num_patches"][0])
        return "<img>" + "<IMG_CONTEXT>" * 4 * tiles + "</img>"
    family_data.assert_ids_as_the_processor_builds(ds, data, tok, "<IMG_CONTEXT>", expand, "<|im_end|>")


def test_a_mismatched_image_seq_length_is_refused(tmp_path):
    src = internvl.build(str(tmp_path / "bad"))
    config = json.loads(open(os.path.join(src, "config.json")).read())
    config["image_seq_length"] = 256
    open(os.path.join(src, "config.json"), "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.image_seq_length is 256, but a 32-pixel tile in 8-pixel patches, "
                                         r"pixel-shuffled by 0.5, gives 4 tokens"):
        prepare.for_model(src, "auto", 512)


def test_padded_batches_and_the_masked_dummy_change_no_loss_or_generated_token(ckpt, data):
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    layout, tok, ds = family_data.items(ckpt, data)
    text, one, two = ds[0], ds[1], ds[2]
    assert "pixel_values" not in text and one["pixel_values"].shape[0] > 1 and two["pixel_values"].shape[0] > 2

    loss = family_data.loss_of(model, layout, tok)
    assert loss([text, one, two]) == pytest.approx(loss([text]) + loss([one]) + loss([two]), rel=1e-5)
    family_data.assert_packing_matches_padding(model, layout, tok, [one, text, two])
    dummy = layout.dummy()
    assert len(dummy.ids) == 6 and dummy.tensors["pixel_values"].shape == (1, 3, 32, 32)
    assert loss([text, ds[3]], dummy) == pytest.approx(loss([text, ds[3]]), rel=1e-6)
    prompt = torch.tensor(tok.apply_chat_template([{"role": "user", "content": "Describe"}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
    assert_dummy_changes_no_generation(model, layout, tok, prompt)


def test_importance_then_pruning_writes_a_model_that_generates_with_its_cache(ckpt, data, tmp_path):
    assert family_data.check_importance_and_pruning(ckpt, data, tmp_path)["pinned"]["layers"] == []
