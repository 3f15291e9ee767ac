"""Property-based: generated malformed samples thrown at the readers, generated strings at the region parser.

A sample may only become a bad-sample reason (formats.REASONS), a file a ValueError naming it, a region spec a
RegionError; nothing else may escape. The counts tried are in README (tests section).
"""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.word_tokenizer import word_tokenizer
from lvlm_region.data import formats
from lvlm_region.model import regions
from lvlm_region.data import prepare
from lvlm_region.model.families.llava import FixedImages
from lvlm_region.data.templates import resolve

TOK = word_tokenizer("USER: ASSISTANT: what is it red")
ENC = prepare.Encoding(resolve("vicuna_v1", TOK, "t"), FixedImages(image_token_id=4, n_image_tokens=2),
                 max_length=64)
SAMPLES = 600  # per property: README reports the totals

scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=30)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c,
                                                                                          max_size=4), max_leaves=20)
roles = st.sampled_from(["human", "gpt", "user", "assistant", "system", "", "tool", "GPT"]) | json_values
contents = st.text(max_size=40) | st.sampled_from(["<image>", "<image>\nwhat", "what <image> <image>", ""]) | \
    json_values
turn = st.fixed_dictionaries({}, optional={"from": roles, "role": roles, "value": contents, "content": contents,
                                           "extra": json_values})
record = st.fixed_dictionaries({}, optional={
    "id": json_values, "conversations": st.lists(turn | json_values, max_size=5) | json_values,
    "messages": st.lists(turn | json_values, max_size=5) | json_values,
    "image": st.text(max_size=20) | st.lists(st.text(max_size=10) | json_values, max_size=3) | json_values,
    "images": st.lists(st.text(max_size=10) | json_values, max_size=3) | json_values})
raw_text = (record.map(json.dumps) | json_values.map(json.dumps) | st.text(max_size=200)
            | st.just("[" * 5000) | st.just('{"conversations": ' + "[" * 3000 + "]" * 3000 + "}"))


@settings(max_examples=SAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_text)
def test_a_generated_sample_is_kept_or_dropped_with_a_documented_reason(tmp_path_factory, text):
    folder = tmp_path_factory.getbasetemp()  # no images there: image samples become missing_image and the like
    row = prepare.encode({"line": 1, "raw": text}, str(folder), ENC, TOK)
    assert row["reason"] in formats.REASONS or (row["reason"] == "" and row["input_ids"])


@settings(max_examples=SAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])
@given(st.lists(raw_text, max_size=6), st.sampled_from(["json", "jsonl"]), st.booleans())
def test_a_generated_file_yields_records_or_one_named_error(tmp_path, lines, ext, as_list):
    path = tmp_path / f"data.{ext}"
    body = "\n".join(lines)
    path.write_text(("[" + ",\n".join(lines) + "]") if as_list and ext == "json" else body, encoding="utf-8")
    try:
        for _, text in formats.records(str(path)):
            try:
                formats.normalize(text)
            except formats.BadSample as e:
                assert e.reason in formats.REASONS
    except ValueError as e:  # the whole file is unusable: named
        assert str(path) in str(e)


@settings(max_examples=SAMPLES, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"(uniform|first|last|middle|layers:|full|none|paper32)[0-9:, .+-]{0,12}"
                                            r"([+-] ?(projector|vision|embed|norm|lm_head|x))?", fullmatch=True),
       st.integers(1, 80), st.booleans())
def test_a_generated_region_spec_resolves_or_is_refused_by_name(spec, depth, tied):
    try:
        region = regions.resolve(spec, depth, tied=tied)
    except regions.RegionError as e:
        assert "invalid region spec" in str(e) and "valid region specs" in str(e)
        return
    assert all(0 <= i < depth for i in region.layers) and list(region.layers) == sorted(set(region.layers))
    assert region.layers or any(region.parts.values())
    assert not tied or region.parts["embed"] == region.parts["lm_head"]
