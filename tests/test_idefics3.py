"""Idefics3 (SmolVLM) on a tiny random checkpoint written by transformers' own classes (helpers/idefics3.py): prepared
ids and pixels equal Idefics3Processor's (row / column tags, newlines, the global image), padded batches and the
masked dummy change no loss, refusals. The 2-rank ZeRO-3 run is in test_train_distributed.py, the resume in
test_resume.py, the FLOP model in test_flops.py."""
import json
import os

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from conftest import assert_dummy_changes_no_generation
from helpers import family_data, idefics3
from lvlm_region.data import prepare
from lvlm_region.data.images import ImageLoader
from lvlm_region.data.templates import IGNORE

SIZES = [(32, 32), (60, 40), (100, 50), (30, 90), (200, 70), (130, 20)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return idefics3.build(str(tmp_path_factory.mktemp("idefics3") / "ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return family_data.write(tmp_path_factory.mktemp("idefics3_data"), SIZES)


def test_prepared_ids_and_pixels_are_what_idefics3_processor_makes(ckpt, data, tmp_path):
    enc, tok, processor = prepare.for_model(ckpt, "auto", 1024)
    assert type(processor).__name__ == "Idefics3Processor"
    load = ImageLoader(processor.image_processor, "square")
    tiles = set()
    for w, h in SIZES:  # the header size's ids are the processor's for the decoded image
        Image.new("RGB", (w, h), "red").save(tmp_path / "x.png")
        want = processor(text="<image>", images=[Image.open(tmp_path / "x.png")], return_tensors="pt")
        assert enc.layout.token_ids((w, h)) == want["input_ids"][0].tolist()
        got = load(str(tmp_path / "x.png"))
        assert torch.equal(got["pixel_values"], want["pixel_values"][0]) and bool(want["pixel_attention_mask"].all())
        assert enc.layout.tokens_in(got) == int((want["input_ids"] == enc.layout.image_token_id).sum())
        tiles.add(got["pixel_values"].shape[0])
    assert len(tiles) >= 3
    assert "\n" in tok.decode(enc.layout.token_ids((60, 40)))  # the rows' newlines are tokens
    path, folder = data
    ds = prepare.prepare(path, folder, enc, tok, str(tmp_path / "prep"))
    for row, sample in zip(ds, json.loads(open(path).read())):
        names = sample.get("image") or []
        names = [names] if isinstance(names, str) else names
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in sample["conversations"]]
        text = processor.apply_chat_template(messages, tokenize=False)
        assert text.endswith("<end_of_utterance>\n")
        images = [Image.open(os.path.join(folder, n)).convert("RGB") for n in names] or None
        want = processor(text=text[:-1], images=images, add_special_tokens=False, return_tensors="pt")
        assert row["input_ids"] == want["input_ids"][0].tolist(), sample["id"]
        replies = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        trained = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
        assert trained == "".join(f" {r}<end_of_utterance>" for r in replies)


def test_a_processor_whose_tiles_differ_from_the_tower_is_refused(tmp_path):
    src = idefics3.build(str(tmp_path / "bad"))
    path = os.path.join(src, "processor_config.json")
    config = json.loads(open(path).read())
    config["image_processor"]["max_image_size"] = {"longest_edge": 64}
    open(path, "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=r"the image processor's tiles are 64 px \(max_image_size\), the vision tower "
                                         r"takes 32 px"):
        prepare.for_model(src, "auto", 1024)


def test_padded_batches_and_the_masked_dummy_change_no_loss_or_generated_token(ckpt, data):
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    layout, tok, ds = family_data.items(ckpt, data)
    text, one, two = ds[0], ds[1], ds[2]
    assert "pixel_values" not in text and one["pixel_values"].shape[0] > 1
    loss = family_data.loss_of(model, layout, tok)
    assert loss([text, one, two]) == pytest.approx(loss([text]) + loss([one]) + loss([two]), rel=1e-5)
    family_data.assert_packing_matches_padding(model, layout, tok, [one, text, two])
    dummy = layout.dummy()
    assert dummy.tensors["pixel_values"].shape == (1, 3, 32, 32)
    assert loss([text, ds[3]], dummy) == pytest.approx(loss([text, ds[3]]), rel=1e-6)
    prompt = torch.tensor(tok.apply_chat_template([{"role": "user", "content": "Describe the image."}],
                                                  tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    assert_dummy_changes_no_generation(model, layout, tok, prompt)


def test_importance_then_pruning_writes_a_model_that_generates_with_its_cache(ckpt, data, tmp_path):
    assert family_data.check_importance_and_pruning(ckpt, data, tmp_path)["pinned"]["layers"] == []


def test_smolvlm2_ids_are_what_its_processor_writes_and_batches_change_no_loss(data, tmp_path):
    """SmolVLM2 (``smolvlm``): the same layout, loaded without its processor class (it needs torchvision): ids equal
    SmolVLM's own get_image_prompt_string on the image processor's rows and columns, tokenized; image_seq_len is read
    from processor_config.json; padded batches, the dummy and packing change no loss."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
    ckpt = idefics3.build_smolvlm(str(tmp_path / "smol"))
    enc, tok, processor = prepare.for_model(ckpt, "auto", 1024)
    assert type(processor).__name__ == "SplitProcessor" and processor.image_seq_len == 4
    ip = processor.image_processor
    for w, h in SIZES:
        Image.new("RGB", (w, h), "red").save(tmp_path / "x.png")
        out = ip(images=[[Image.open(tmp_path / "x.png")]], return_row_col_info=True)
        text = get_image_prompt_string(out["rows"][0][0], out["cols"][0][0], 4, "<fake_token_around_image>",
                                       "<image>", "<global-img>")
        assert enc.layout.token_ids((w, h)) == tok(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    layout, tok, ds = family_data.items(ckpt, data)
    loss = family_data.loss_of(model, layout, tok)
    assert loss([ds[0], ds[1], ds[2]]) == pytest.approx(loss([ds[0]]) + loss([ds[1]]) + loss([ds[2]]), rel=1e-5)
    assert loss([ds[0], ds[3]], layout.dummy()) == pytest.approx(loss([ds[0], ds[3]]), rel=1e-6)
    family_data.assert_packing_matches_padding(model, layout, tok, [ds[1], ds[0], ds[2]])
