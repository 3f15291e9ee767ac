"""Batching: the masked dummy image for text-only batches; a failing rank with an open loader exits."""
import os
import subprocess
import sys
from pathlib import Path

from lvlm_region.templates import IGNORE


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
