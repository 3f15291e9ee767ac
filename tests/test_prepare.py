"""Reading every input format, and preparation: bad samples dropped and counted by reason, the threshold and
--on-bad-sample error, the report, the cache, prepared-directory checks. Real files, real `datasets`."""
import json
import logging
import os

import datasets
import pytest
from PIL import Image

from helpers.word_tokenizer import word_tokenizer
from lvlm_region.data import formats
from lvlm_region.data import prepare
from lvlm_region.model.families.llava import FixedImages
from lvlm_region.data.templates import IGNORE, resolve

WORDS = "USER: ASSISTANT: SYS what is it red blue a square circle long"


def encoding(tok, max_length=40):
    return prepare.Encoding(resolve("vicuna_v1", tok, "t"), FixedImages(image_token_id=4, n_image_tokens=2),
                      max_length=max_length)


def llava(id_, q, a, image=None):
    s = {"id": id_, "conversations": [{"from": "system", "value": "SYS"}, {"from": "human", "value": q},
                                      {"from": "gpt", "value": a}]}
    if image:
        s["image"] = image
    return s


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (16, 12), "red").save(d / "good.png")
    (d / "text.png").write_text("not an image at all")
    Image.effect_noise((128, 128), 64).convert("RGB").save(d / "full.jpg", quality=95)  # the header is < half
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1)).save(d / "tiny.png")
    Image.new("1", (20000, 20000)).save(d / "huge.png")
    return d


BAD_LINES = {  # line -> (record or raw text, reason)
    3: ("{not json", "malformed_json"),
    4: ({"id": "nc"}, "missing_conversations"),
    5: ({"id": "na", "conversations": [{"from": "human", "value": "what"}]}, "no_assistant_reply"),
    6: (llava("er", "what", "  "), "empty_reply"),
    7: (llava("cm", "what is it", "red", image="good.png"), "image_count_mismatch"),
    8: (llava("mi", "<image>\nwhat", "red", image="missing.png"), "missing_image"),
    9: (llava("ni", "<image>\nwhat", "red", image="text.png"), "unreadable_image"),
    10: (llava("tr", "<image>\nwhat", "blue", image="truncated.jpg"), "unreadable_image"),
    11: (llava("ti", "<image>\nwhat", "red", image="tiny.png"), "image_too_small"),
    12: (llava("hu", "<image>\nwhat", "red", image="huge.png"), "image_too_large"),
    13: (llava("tl", "<image>\n" + "long " * 40, "red", image="good.png"), "too_long"),
}


def write_mixed(path):
    lines = {1: llava("g1", "<image>\nwhat is it", "a red square", image="good.png"),
             2: {"id": "g2", "messages": [{"role": "user", "content": "what is it"},
                                          {"role": "assistant", "content": "blue"}]},
             14: {"id": "g3", "messages": [{"role": "user", "content": "<image>what"},
                                           {"role": "assistant", "content": "blue circle"}], "images": ["full.jpg"]},
             **{n: rec for n, (rec, _) in BAD_LINES.items()}}
    path.write_text("".join((v if isinstance(v, str) else json.dumps(v)) + "\n" for _, v in sorted(lines.items())))
    return path


def test_every_bad_sample_is_dropped_counted_and_listed(tmp_path, folder):
    tok = word_tokenizer(WORDS)
    data = write_mixed(tmp_path / "mixed.jsonl")
    ds = prepare.prepare(str(data), str(folder), encoding(tok), tok, str(tmp_path / "prep"), max_bad_fraction=1.0)
    assert ds["id"] == ["g1", "g2", "g3"] and ds["line"] == [1, 2, 14]
    assert ds["modality"] == ["image", "text", "image"] and ds["images"] == [["good.png"], [], ["full.jpg"]]
    # g1: <s> SYS USER: <image> <image> what is it ASSISTANT: [a red square </s>]
    g1 = ds[0]
    assert tok.convert_ids_to_tokens(g1["input_ids"]) == ["<s>", "SYS", "USER:", "<image>", "<image>", "what", "is",
                                                          "it", "ASSISTANT:", "a", "red", "square", "</s>"]
    assert g1["labels"] == [IGNORE] * 9 + g1["input_ids"][9:] and g1["length"] == 13
    assert json.loads(g1["messages"])[0] == {"role": "system", "content": "SYS"}

    report = json.loads((tmp_path / "prep" / "report.json").read_text())
    assert (report["samples"], report["kept"], report["dropped"]) == (14, 3, 11)
    assert report["kept_with_images"] == 2 and report["kept_text_only"] == 1
    assert report["dropped_by_reason"] == {"empty_reply": 1, "image_count_mismatch": 1, "image_too_large": 1,
                                           "image_too_small": 1, "malformed_json": 1, "missing_conversations": 1,
                                           "missing_image": 1, "no_assistant_reply": 1, "too_long": 1,
                                           "unreadable_image": 2}
    assert {d["line"]: d["reason"] for d in report["dropped_samples"]} == {n: r for n, (_, r) in BAD_LINES.items()}
    by_line = {d["line"]: d for d in report["dropped_samples"]}
    assert "Image size (400000000 pixels)" in by_line[12]["detail"] and "1x1" in by_line[11]["detail"]
    assert by_line[13]["detail"] == "48 tokens > --max-length 40"  # <s> SYS USER: 2 image 40 words ASSISTANT: red </s>
    assert json.loads((tmp_path / "prep" / "prepare.json").read_text())["kept"] == 3
    assert datasets.load_from_disk(str(tmp_path / "prep"))["id"] == ["g1", "g2", "g3"]


def test_header_only_verification_keeps_the_truncated_file(tmp_path, folder):
    tok = word_tokenizer(WORDS)
    enc = prepare.Encoding(resolve("vicuna_v1", tok, "t"), FixedImages(4, 2), 40, verify_images="header")
    ds = prepare.prepare(str(write_mixed(tmp_path / "m.jsonl")), str(folder), enc, tok, str(tmp_path / "p"),
                   max_bad_fraction=1.0)
    assert "tr" in ds["id"] and "ni" not in ds["id"]  # a text file is not an image even by its header


def test_too_many_bad_samples_stop_before_training_with_a_summary(tmp_path, folder):
    tok = word_tokenizer(WORDS)
    data = write_mixed(tmp_path / "mixed.jsonl")
    with pytest.raises(prepare.DataError,
                       match=r"11 of 14 samples \(78.6%\) are bad, more than --max-bad-fraction 5.0%: "
                             r"empty_reply 1, .*unreadable_image 2; every dropped sample is listed in "
                             + str(tmp_path / "prep" / "report.json")):
        prepare.prepare(str(data), str(folder), encoding(tok), tok, str(tmp_path / "prep"))
    assert json.loads((tmp_path / "prep" / "report.json").read_text())["dropped"] == 11
    assert not prepare.is_prepared(str(tmp_path / "prep"))


def test_on_bad_sample_error_names_the_first_bad_line(tmp_path, folder):
    tok = word_tokenizer(WORDS)
    with pytest.raises(prepare.DataError, match=r"--on-bad-sample error: .*mixed.jsonl line/row 3 \(id ''\) is bad: "
                                          r"malformed_json: .*\(11 bad samples in all\)"):
        prepare.prepare(str(write_mixed(tmp_path / "mixed.jsonl")), str(folder), encoding(tok), tok,
                  str(tmp_path / "prep"), on_bad_sample="error", max_bad_fraction=1.0)


def test_second_run_reuses_and_a_changed_input_rebuilds(tmp_path, folder, caplog):
    tok = word_tokenizer(WORDS)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(llava("a", "<image>\nwhat", "red", image="good.png")) + "\n")
    out = str(tmp_path / "prep")
    prepare.prepare(str(data), str(folder), encoding(tok), tok, out)
    arrow = [f for f in os.listdir(out) if f.endswith(".arrow")][0]
    before = os.stat(os.path.join(out, arrow)).st_mtime_ns
    with caplog.at_level(logging.INFO, logger="lvlm_region.data.prepare"):
        assert len(prepare.prepare(str(data), str(folder), encoding(tok), tok, out)) == 1
    assert "already prepared" in caplog.text
    assert os.stat(os.path.join(out, arrow)).st_mtime_ns == before
    with data.open("a") as f:
        f.write(json.dumps(llava("b", "what", "blue")) + "\n")
    assert prepare.prepare(str(data), str(folder), encoding(tok), tok, out)["id"] == ["a", "b"]
    # another max length is another preparation
    # (a: <s> SYS USER: <image> <image> what ASSISTANT: red </s> is 9 tokens, b 7)
    assert prepare.prepare(str(data), str(folder), encoding(tok, max_length=8), tok, out,
                     max_bad_fraction=0.5)["id"] == ["b"]


def test_a_prepared_directory_for_another_model_is_refused(tmp_path, folder):
    tok = word_tokenizer(WORDS)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(llava("a", "what", "red")) + "\n")
    out = str(tmp_path / "prep")
    prepare.prepare(str(data), str(folder), encoding(tok), tok, out)
    _, meta = prepare.load_prepared(out)
    prepare.check_matches(meta, out, encoding(tok), tok)
    other = word_tokenizer(WORDS + " extra")
    with pytest.raises(ValueError, match=r"was prepared for another model or settings \(tokenizer_digest: .*; "
                                         r"max_length: prepared 40, this run 64\); prepare it again"):
        prepare.check_matches(meta, out, encoding(other, max_length=64), other)


def test_json_list_is_read_element_by_element_with_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_CHUNK", 7)  # every element spans several reads
    samples = [llava("a", "what, is ] it {", "red"), llava("b", "x\ny", "blue"), {"id": 3, "conversations": []}]
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(s, indent=1) for s in samples) + "\n]\n")
    got = list(formats.records(str(path)))
    assert [json.loads(raw) for _, raw in got] == samples
    assert [line for line, _ in got] == [2, 2 + 17, 2 + 34]  # each indented sample takes 17 lines
    path.write_text('[{"id": 1, "conversations": []},\n {"id": 2 "x": 1}]')
    with pytest.raises(ValueError, match=r"d.json is not a valid LLaVA JSON list: Expecting ',' delimiter "
                                         r"\(column 10\) at line 2"):
        list(formats.records(str(path)))


@pytest.mark.parametrize("kind", ["parquet", "datasets", "arrow"])
def test_tables_on_disk(tmp_path, kind):
    rows = [llava("a", "<image>\nwhat", "red", image="x.png"), llava("b", "what", "blue")]
    rows[1]["image"] = None
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "d"
        ds.save_to_disk(str(path))
        if kind == "arrow":
            path = next(path.glob("*.arrow"))
    got = [formats.normalize(raw) for _, raw in formats.records(str(path))]
    assert [g["id"] for g in got] == ["a", "b"] and [g["images"] for g in got] == [["x.png"], []]
    assert got[1]["messages"] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "what"},
                                  {"role": "assistant", "content": "blue"}]


def test_embedded_images_are_refused_by_name(tmp_path):
    ds = datasets.Dataset.from_dict({"images": [[Image.new("RGB", (8, 8))]], "messages": [[]]},
                                    features=datasets.Features({
                                        "images": datasets.Sequence(datasets.Image()),
                                        "messages": datasets.Sequence(datasets.Value("string"))}))
    ds.to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(ValueError, match=r"column 'images' holds embedded images"):
        list(formats.records(str(tmp_path / "e.parquet")))


@pytest.mark.parametrize("path,problem", [("missing.json", "does not exist"), ("d.csv", "unknown file type '.csv'"),
                                          ("dir", "not a `datasets` save_to_disk directory")])
def test_unusable_inputs_are_named(tmp_path, path, problem):
    (tmp_path / "d.csv").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=problem):
        formats.kind(str(tmp_path / path))


def test_image_paths_leaving_the_folder_are_dropped_unopened(tmp_path, folder):
    tok = word_tokenizer(WORDS)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (16, 16), "blue").save(outside)
    os.symlink(outside, folder / "link.png")  # a link inside the folder that points out of it
    (folder / "sub").mkdir()
    rows = [llava("abs", "<image>\nwhat", "red", image="/etc/hostname"),
            llava("up", "<image>\nwhat", "red", image="../secret.png"),
            llava("up2", "<image>\nwhat", "red", image="sub/../../secret.png"),
            llava("ln", "<image>\nwhat", "red", image="link.png"),
            llava("ok", "<image>\nwhat", "red", image="sub/../good.png")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = prepare.prepare(str(data), str(folder), encoding(tok), tok, str(tmp_path / "prep"), max_bad_fraction=1.0)
    assert ds["id"] == ["ok"]
    report = json.loads((tmp_path / "prep" / "report.json").read_text())
    assert report["dropped_by_reason"] == {"image_outside_folder": 4}
    detail = {d["id"]: d["detail"] for d in report["dropped_samples"]}
    assert detail["abs"].startswith("'/etc/hostname' leaves the image folder") and "--allow-outside-images" in \
        detail["abs"]
    assert "size" not in detail["abs"]  # never opened: nothing about the file is reported
    # --allow-outside-images: data sets that use absolute paths keep them.
    enc = prepare.Encoding(encoding(tok).template, encoding(tok).layout, 40, allow_outside_images=True)
    ds = prepare.prepare(str(data), str(folder), enc, tok, str(tmp_path / "prep2"), max_bad_fraction=1.0)
    assert ds["id"] == ["up", "up2", "ln", "ok"]  # /etc/hostname is opened now, and is no image: unreadable_image
    assert json.loads((tmp_path / "prep2" / "report.json").read_text())["dropped_by_reason"] == {"unreadable_image": 1}


def test_text_the_tokenizer_cannot_reproduce_is_counted_with_an_example(tmp_path, caplog):
    tok = word_tokenizer(WORDS)  # word-level: an unknown word becomes <unk>
    rows = [llava("k1", "what is it", "red"), llava("k2", "what is it", "red Zürich"), llava("k3", "what", "blue")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        ds = prepare.prepare(str(data), str(tmp_path), encoding(tok), tok, str(tmp_path / "prep"))
    assert len(ds) == 3 and "lossy" not in ds.column_names  # kept: a warning, not a bad sample
    report = json.loads((tmp_path / "prep" / "report.json").read_text())
    assert report["lossy_text"] == 1 and report["lossy_text_example"] == {"line": 2, "id": "k2", "text": "red Zürich"}
    assert "1 of 3 kept samples have text the tokenizer does not reproduce" in caplog.text
