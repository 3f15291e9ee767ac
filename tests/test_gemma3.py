"""Gemma 3 on a tiny random checkpoint written by transformers' own classes (helpers/gemma3.py): prepared ids equal
Gemma3Processor's, padded batches and the masked dummy change no loss, refusals, pruning. The 2-rank ZeRO-3 run is in
test_train_distributed.py, the resume in test_resume.py, the FLOP model in test_flops.py."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from conftest import assert_dummy_changes_no_generation, run
from helpers import family_data, gemma3
from lvlm_region.model import families
from lvlm_region.data import prepare
from lvlm_region.tools import prune
from lvlm_region.data.templates import IGNORE

SIZES = [(60, 40), (100, 50), (30, 90), (32, 32), (200, 70)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return gemma3.build(str(tmp_path_factory.mktemp("gemma3") / "ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return family_data.write(tmp_path_factory.mktemp("gemma3_data"), SIZES, second_reply="a square")


def test_prepared_ids_are_what_gemma3_processor_makes_of_the_conversation(ckpt, data, tmp_path):
    """Per sample: our ids equal Gemma3Processor's on the same rendered conversation (each image as its
    "\\n\\n<start_of_image>" + 4 soft tokens + "<end_of_image>\\n\\n", merged with the text next to it), the soft
    tokens are what token_type_ids marks, and only the replies and their <end_of_turn> train."""
    path, folder = data
    enc, tok, _ = prepare.for_model(ckpt, "auto", 512)
    ds = prepare.prepare(path, folder, enc, tok, str(tmp_path / "prep"))
    processor = AutoProcessor.from_pretrained(ckpt)
    assert enc.layout.text_around == ("\n\n", "\n\n") and enc.layout.n_image_tokens == 4
    assert processor.full_image_sequence == "\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>\n\n"
    samples = json.loads(open(path).read())
    assert len(ds) == len(samples)
    n_tokens = set()
    for row, sample in zip(ds, samples):
        messages = [{"role": "user" if t["from"] == "human" else "assistant",
                     "content": t["value"].replace("<image>", "<start_of_image>")} for t in sample["conversations"]]
        text = processor.apply_chat_template(messages, tokenize=False)
        assert text.endswith("<end_of_turn>\n")
        names = sample.get("image") or []
        names = [names] if isinstance(names, str) else names
        images = [Image.open(os.path.join(folder, n)).convert("RGB") for n in names] or None
        want = processor(text=text[:-1], images=images, add_special_tokens=False, return_tensors="pt")
        assert row["input_ids"] == want["input_ids"][0].tolist(), sample["id"]
        ours = enc.layout.extra_inputs({"input_ids": torch.tensor([row["input_ids"]])})["token_type_ids"]
        assert torch.equal(ours, want["token_type_ids"])
        n_tokens.add(int(ours.sum()))
        replies = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        trained = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
        assert trained == "".join(f"{r}<end_of_turn>" for r in replies)
    assert n_tokens == {0, 4, 8}  # every image 4 soft tokens, whatever its size


def test_padded_batches_and_the_masked_dummy_change_no_loss_or_generated_token(ckpt, data):
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    layout, tok, ds = family_data.items(ckpt, data)
    text, one, two = ds[0], ds[1], ds[2]
    assert "pixel_values" not in text and one["pixel_values"].shape == (1, 3, 32, 32)
    assert two["pixel_values"].shape == (2, 3, 32, 32)

    loss = family_data.loss_of(model, layout, tok)
    # Right padding, one and two images in one batch (bidirectional image blocks per row): the losses, summed.
    assert loss([text, one, two]) == pytest.approx(loss([text]) + loss([one]) + loss([two]), rel=1e-5)
    # A text-only batch: the masked dummy image (its soft tokens marked in token_type_ids) changes nothing.
    dummy = layout.dummy()
    assert len(dummy.ids) == 6 and dummy.tensors["pixel_values"].shape == (1, 3, 32, 32)
    assert loss([text, ds[3]], dummy) == pytest.approx(loss([text, ds[3]]), rel=1e-6)
    prompt = torch.tensor(tok.apply_chat_template([{"role": "user", "content": "Describe the image."}],
                                                  tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    assert_dummy_changes_no_generation(model, layout, tok, prompt)


def test_pan_and_scan_and_packing_are_refused(ckpt, tmp_path):
    src = tmp_path / "pan"
    gemma3.build(str(src))
    config = json.loads((src / "processor_config.json").read_text())
    config["image_processor"]["do_pan_and_scan"] = True
    (src / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do_pan_and_scan on: pan-and-scan crops are not supported for training; "
                                         r"set \"do_pan_and_scan\": false"):
        prepare.for_model(str(src), "auto", 512)
    assert families.get("gemma3").no_packing.startswith("builds its bidirectional image attention")


@torch.no_grad()
def test_importance_then_pruning_cuts_layer_types_and_the_pruned_model_generates_with_its_cache(ckpt, data,
                                                                                               tmp_path):
    """launch/importance.py scores the layers (block influence over images and text); pruning the lowest-scoring
    one cuts its entry of layer_types, and the pruned model generates the same with and without its cache."""
    path, folder = data
    scores = tmp_path / "bi" / "scores.json"
    res = run([sys.executable, "launch/importance.py", "--model", ckpt, "--data", path, "--image-folder", folder,
               "--samples", "8", "--output", str(scores)], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    bi = json.loads(scores.read_text())
    assert (bi["method"], bi["layers"], bi["samples"]) == ("bi", 4, 8) and all(0 <= x <= 2 for x in bi["scores"])
    lowest = min(range(4), key=lambda i: bi["scores"][i])
    out = tmp_path / "pruned"
    prune.run(ckpt, str(scores), [1], "none", str(out))
    assert json.loads((out / prune.PRUNE_FILE).read_text())["dropped"] == [lowest]
    text = json.loads((out / "config.json").read_text())["text_config"]
    before = json.loads((Path(ckpt) / "config.json").read_text())["text_config"]["layer_types"]
    assert text["num_hidden_layers"] == 3 and text["layer_types"] == before[:lowest] + before[lowest + 1:]
    assert AutoConfig.from_pretrained(out).text_config.layer_types == text["layer_types"]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    ids = torch.randint(10, 90, (1, 20), generator=torch.Generator().manual_seed(1))  # past the 16-token window
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=model.config.text_config.pad_token_id)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw, use_cache=False))
    families.get("gemma3").load_processor(str(out))
