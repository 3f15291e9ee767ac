"""Rendering and label masks, pinned by hand on a tiny word-level tokenizer."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvlm_region.data import IGNORE, TEMPLATES, read_llava_json, render, tokenize


class WordTokenizer:
    """Maps each whitespace-separated word to a fixed id; enough to pin masks exactly."""
    bos_token_id, eos_token_id = 1, 2
    vocab = {w: i for i, w in enumerate("USER: ASSISTANT: Q1 Q2 A1 A2 two words cap".split(), start=10)}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[w] for w in text.split()]}


IMG = 4


def test_vicuna_multi_turn_masks_every_human_turn():
    conv = [{"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "two words"}]
    template = TEMPLATES["vicuna_v1"]
    segs = render(conv, template)
    assert segs[1:] == [(" USER: <image>\nQ1 ASSISTANT:", False), (" A1", True), (" USER: Q2 ASSISTANT:", False),
                        (" two words", True)]
    out = tokenize(segs[1:], WordTokenizer(), IMG, 3)  # system prompt left out to keep it short
    #                 bos USER: img img img Q1  ASSISTANT: A1 eos USER: Q2 ASSISTANT: two words eos
    assert out["input_ids"] == [1, 10, 4, 4, 4, 12, 11, 14, 2, 10, 13, 11, 16, 17, 2]
    assert out["labels"] == [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 14, 2, IGNORE, IGNORE,
                             IGNORE, 16, 17, 2]


def test_plain_keeps_only_image_and_caption():
    conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "cap"}]
    segs = render(conv, TEMPLATES["plain"])
    assert segs == [("<image>", False), ("cap", True)]
    out = tokenize(segs, WordTokenizer(), IMG, 2)
    assert out["input_ids"] == [1, 4, 4, 18, 2]
    assert out["labels"] == [IGNORE, IGNORE, IGNORE, 18, 2]


@pytest.mark.parametrize("sample,problem", [
    ({"id": "a", "conversations": [{"from": "human", "value": "hi"}]}, "needs 'conversations' with at least"),
    ({"id": "b", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     "turns must alternate human/gpt"),
    ({"id": "c", "image": "x.png", "conversations": [{"from": "human", "value": "no image tag"},
                                                      {"from": "gpt", "value": "y"}]}, "has 0 <image> placeholders but one image"),
])
def test_bad_samples_are_named(tmp_path, sample, problem):
    import json
    path = tmp_path / "d.json"
    path.write_text(json.dumps([sample]))
    with pytest.raises(ValueError, match=problem) as e:
        read_llava_json(str(path))
    assert f"id {sample['id']!r}" in str(e.value)


def test_text_only_batch_gets_masked_dummy_image():
    import torch

    from lvlm_region.data import DummyImage, collate
    batch = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([IGNORE, 6, 2])},
             {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([IGNORE, 7])}]
    out = collate(batch, pad_token_id=0, dummy=DummyImage(image_token_id=4, n_image_tokens=2, image_size=8))
    assert out["input_ids"].tolist() == [[1, 5, 6, 4, 4], [1, 7, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE, 6, 2, IGNORE, IGNORE], [IGNORE, 7, IGNORE, IGNORE, IGNORE]]
    assert out["pixel_values"].shape == (1, 3, 8, 8) and not out["pixel_values"].any()


def test_a_run_that_fails_with_its_loader_still_open_exits_instead_of_hanging(tmp_path):
    # The traceback keeps the iterator alive, so torch leaves the (SIGTERM-ignoring) workers to multiprocessing's
    # exit hook; without data._kill_workers_left_at_exit that hook's join waited forever and the rank hung.
    script = tmp_path / "fail.py"
    script.write_text(
        "import torch\n"
        "from lvlm_region.data import make_loader\n"
        "ds = [{'input_ids': torch.tensor([1, 2, 3]), 'labels': torch.tensor([-100, 2, 3])}] * 64\n"
        "it = iter(make_loader(ds, 4, 0, 0, 1, 0, True, True, num_workers=2))\n"
        "assert next(it)['input_ids'].shape == (4, 3)\n"
        "raise RuntimeError('the training step failed')\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode == 1
    assert "RuntimeError: the training step failed" in res.stderr
