"""Batching: the masked dummy image for text-only batches; a failing rank with an open loader exits."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvlm_region.data.templates import IGNORE


def test_text_only_batch_gets_masked_dummy_image():
    import torch

    from lvlm_region.data.batches import collate
    from lvlm_region.model.families.llava import FixedImages
    batch = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([IGNORE, 6, 2])},
             {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([IGNORE, 7])}]
    dummy = FixedImages(image_token_id=4, n_image_tokens=2, image_size=8).dummy()
    out = collate(batch, pad_token_id=0, dummy=dummy)
    assert out["input_ids"].tolist() == [[1, 5, 6, 4, 4], [1, 7, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE, 6, 2, IGNORE, IGNORE], [IGNORE, 7, IGNORE, IGNORE, IGNORE]]
    assert out["pixel_values"].shape == (1, 3, 8, 8) and not out["pixel_values"].any()
    # Left-padded (generation prompts): the dummy's tokens go in front of row 0's prompt, masked out.
    left = collate(batch, pad_token_id=0, left_pad=True, dummy=dummy)
    assert left["input_ids"].tolist() == [[4, 4, 1, 5, 6], [0, 0, 0, 1, 7]]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert left["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 6, 2], [IGNORE, IGNORE, IGNORE, IGNORE, 7]]
    assert left["pixel_values"].shape == (1, 3, 8, 8)


def test_a_run_that_fails_with_its_loader_still_open_exits_instead_of_hanging(tmp_path):
    # The traceback keeps the iterator alive, so torch leaves the (SIGTERM-ignoring) workers to multiprocessing's
    # exit hook; without data._kill_workers_left_at_exit that hook's join waited forever and the rank hung.
    script = tmp_path / "fail.py"
    script.write_text(
        "import torch\n"
        "from lvlm_region.data.batches import make_loader\n"
        "ds = [{'input_ids': torch.tensor([1, 2, 3]), 'labels': torch.tensor([-100, 2, 3])}] * 64\n"
        "it = iter(make_loader(ds, 4, 0, 0, 1, 0, True, True, num_workers=2))\n"
        "assert next(it)['input_ids'].shape == (4, 3)\n"
        "raise RuntimeError('the training step failed')\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode == 1
    assert "RuntimeError: the training step failed" in res.stderr


def test_grouped_sampler_keeps_a_small_modality():
    from lvlm_region.data.batches import grouped_order
    import torch
    lengths, is_image = list(range(100, 140)), [True] * 37 + [False] * 3  # 3 text-only samples, global batch 8
    batches = grouped_order(lengths, is_image, 4, 2, torch.Generator().manual_seed(0))
    used = {i for b in batches for i in b}
    assert {37, 38, 39} <= used and len(used) == 40  # 37 + 3 = 40 = 5 global batches: nothing left out


def test_grouped_sampler_batches_one_modality_of_similar_length_deterministically():
    import random

    from lvlm_region.data.batches import GroupedSampler
    rng = random.Random(0)
    n, b, world = 1000, 4, 2
    lengths = [rng.randint(20, 2000) for _ in range(n)]
    is_image = [rng.random() < 0.8 for _ in range(n)]
    ranks = [GroupedSampler(lengths, is_image, b, world, r, seed=3) for r in range(world)]
    orders = [list(s) for s in ranks]
    assert len(orders[0]) == len(orders[1]) == len(ranks[0]) and len(orders[0]) % b == 0
    flat = orders[0] + orders[1]
    assert len(set(flat)) == len(flat) and len(flat) > n - b * world  # no duplicates; < one global batch left out
    pad_grouped, pad_random, mixed = 0, 0, 0
    shuffled = list(range(n))
    rng.shuffle(shuffled)
    for k in range(0, len(orders[0]), b):
        glob = orders[0][k:k + b] + orders[1][k:k + b]  # one optimizer step's samples over both ranks
        mixed += len({is_image[i] for i in glob}) > 1
    assert mixed <= 1  # one modality per global batch, but for the one made of both modalities' leftovers
    for k in range(0, len(orders[0]), b):
        for mb in (orders[0][k:k + b], orders[1][k:k + b]):  # padding within each rank's micro-batch
            pad_grouped += sum(max(lengths[i] for i in mb) - lengths[i] for i in mb)
        mb = shuffled[k:k + b]
        pad_random += sum(max(lengths[i] for i in mb) - lengths[i] for i in mb) * 2
    assert pad_grouped < 0.2 * pad_random  # far less padding than a random order of the same samples
    again = GroupedSampler(lengths, is_image, b, world, 0, seed=3)
    assert list(again) == orders[0]  # deterministic per seed and epoch
    again.set_epoch(1)
    assert list(again) != orders[0]
    again.set_epoch(0)
    again.skip_epoch, again.skip = 0, 12  # what BatchStream sets on resume: continue at sample 12
    assert list(again) == orders[0][12:]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_padded_batch_loss_and_gradients(demo_dir, attn):
    # (use_cache=False, as the trainer: with a KV cache transformers does not treat the row as packed)
    import torch
    from transformers import LlavaForConditionalGeneration

    from lvlm_region.data.batches import collate, collate_packed
    from lvlm_region.model.families.llava import FixedImages
    from lvlm_region.model.loss import token_loss_sum
    model = LlavaForConditionalGeneration.from_pretrained(demo_dir / "base_model", attn_implementation=attn)
    g = torch.Generator().manual_seed(0)
    image_id = model.config.image_token_id
    samples = []
    for n, with_image in ((9, True), (5, False), (12, True)):
        ids = torch.randint(5, 100, (n,), generator=g)
        if with_image:
            ids[2:6] = image_id  # 4 image tokens per image
        labels = ids.clone()
        labels[:7] = IGNORE
        s = {"input_ids": ids, "labels": labels}
        if with_image:
            s["pixel_values"] = torch.randn(1, 3, 32, 32, generator=g)
        samples.append(s)

    def loss_and_grads(batch):
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), pixel_values=batch.get("pixel_values"), use_cache=False)
        loss = token_loss_sum(out.logits, batch["labels"])
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    padded = collate(samples, pad_token_id=0)
    packed = collate_packed(samples)
    assert packed["input_ids"].shape == (1, 26) and "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [list(range(9)) + list(range(5)) + list(range(12))]
    assert (packed["n_tokens"], packed["n_samples"], packed["rows"]) == (26, 3, [(1, 9), (1, 5), (1, 12)])
    loss_a, grads_a = loss_and_grads(padded)
    loss_b, grads_b = loss_and_grads(packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    scale = max(float(g.abs().max()) for g in grads_a.values())
    for k in grads_a:  # equal up to fp32 summation order (key biases have analytically zero gradients: noise)
        assert float((grads_b[k] - grads_a[k]).abs().max()) <= 1e-5 * scale, k
    # A text-only packed micro-batch gets the dummy image as a separate, unlabelled sample at the end.
    text = collate_packed([samples[1]], dummy=FixedImages(image_id, 4, image_size=32).dummy())
    assert text["input_ids"][0, 5:].tolist() == [image_id] * 4 and text["position_ids"][0, 5:].tolist() == [0, 1, 2, 3]
    assert (text["labels"][0, 5:] == IGNORE).all() and text["real_images"] == 0
    loss_c, _ = loss_and_grads(text)
    loss_d, _ = loss_and_grads(collate([samples[1]], pad_token_id=0))
    torch.testing.assert_close(loss_c, loss_d, rtol=1e-5, atol=1e-5)


def test_generation_from_text_only_prompts_with_the_dummy_image_is_unchanged(demo_dir):
    """The masked dummy in front of a left-padded prompt changes no generated token or score (transformers'
    generate fails on such a batch without any image, and under ZeRO-3 the ranks must all run the tower)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from lvlm_region.data.batches import collate
    from lvlm_region.model import families

    base = demo_dir / "base_model"
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    long, short = torch.tensor(tok("what color is the shape").input_ids), torch.tensor(tok("what color").input_ids)
    batch = [{"input_ids": long, "labels": long}, {"input_ids": short, "labels": short}]
    dummy = families.get("llava").image_layout(model.config, None, "pad").dummy()
    outs = []
    for d in (dummy, None):
        b = collate(batch, tok.pad_token_id, left_pad=True, dummy=d)
        assert ("pixel_values" in b) == (d is not None)
        extra = {"pixel_values": b["pixel_values"]} if d is not None else {}
        g = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=8,
                           min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, output_scores=True,
                           return_dict_in_generate=True, **extra)
        outs.append((g.sequences[:, b["input_ids"].shape[1]:], torch.stack(g.scores)))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)
