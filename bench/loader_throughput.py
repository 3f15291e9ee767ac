"""Padding and throughput with and without length grouping and packing, side by side in one run.

    python bench/loader_throughput.py [--samples 3000] [--steps 40] [--micro-batch 16] [--num-workers 2]

Builds a prepared data set for the demo model whose lengths follow an instruction-tuning mix (80% image samples,
4 image tokens + 20..400 text tokens; 20% text-only, 30..800 tokens; real demo images), then trains the demo
model for --steps steps (1 rank, ZeRO-2, the real training loop) in four arms: random order + padding (LLaVA
without group_by_modality_length), length-grouped + padding, random + packing, grouped + packing. For each arm it
prints the padding fraction of the batches read (padded positions / all positions), real tokens/s and the data
wait as a share of step time (steady state, from run.json), and each arm's tokens/s relative to the first.
"""
import argparse
import json
import logging
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import datasets  # noqa: E402

from lvlm_region.data import demo, prepare
from lvlm_region.config import DEMO_DIR, RunConfig  # noqa: E402
from lvlm_region.data.batches import BatchStream, ImageTextDataset  # noqa: E402
from lvlm_region.data.templates import IGNORE  # noqa: E402
from lvlm_region.data.batches import run_loader  # noqa: E402
from lvlm_region.train.run_setup import obtain_data, setup  # noqa: E402
from lvlm_region.train.trainer import train  # noqa: E402


def make_prepared(out: str, n: int, seed: int = 0) -> str:
    """A prepared directory (with a valid prepare.json for the demo model) of synthetic token sequences."""
    enc, tok, _ = prepare.for_model(os.path.join(DEMO_DIR, "base_model"), "auto", 2048)
    images = sorted(os.listdir(os.path.join(DEMO_DIR, "images")))
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        with_image = rng.random() < 0.8
        text = rng.randint(20, 400) if with_image else rng.randint(30, 800)
        ids = [tok.bos_token_id] + [rng.randint(5, len(tok) - 10) for _ in range(text)]
        if with_image:
            ids[1:1] = enc.layout.token_ids((32, 32))
        prompt = len(ids) // 3
        rows.append({"line": i + 1, "id": str(i), "messages": "[]",
                     "images": [os.path.join("images", images[i % len(images)])] if with_image else [],
                     "input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:], "length": len(ids),
                     "modality": "image" if with_image else "text"})
    features = prepare.FEATURES.copy()
    del features["reason"], features["detail"]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(out)
    src = os.path.join(out, "source.jsonl")  # the identity names a data file; this one stands for the synthetic set
    open(src, "w").close()
    with open(os.path.join(out, prepare.MARKER), "w") as f:
        json.dump({"identity": prepare.identity(src, DEMO_DIR, enc, tok), "kept": n, "dropped": 0}, f)
    return out


def padding_fraction(cfg: RunConfig, steps: int) -> float:
    s = setup(cfg)
    ds, folder = obtain_data(cfg.data, None, "train", s)
    items = ImageTextDataset(ds, folder, s.load_image, s.encoding.layout)
    stream = BatchStream(run_loader(items, s.cfg, s.tokenizer.pad_token_id, s.encoding.layout.dummy(), 0, 1,
                                        shuffle=True, drop_last=True, training=True))
    real = total = 0
    for _ in range(steps):
        b = next(stream)
        real += b["n_tokens"]
        total += b["input_ids"].numel()
    return 1 - real / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=RunConfig.num_workers)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    demo.ensure(DEMO_DIR)
    arms = [("random + padding", False, False), ("grouped + padding", True, False),
            ("random + packing", False, True), ("grouped + packing", True, True)]
    results = []
    with tempfile.TemporaryDirectory() as root:
        data = make_prepared(os.path.join(root, "data"), args.samples)
        for name, group, pack in arms:
            cfg = RunConfig(stage="sft", output_dir=os.path.join(root, name.replace(" ", "")), data=data,
                            max_steps=args.steps, micro_batch=args.micro_batch, num_workers=args.num_workers,
                            group_by_length=group, packing=pack, log_every=10 ** 6, model=os.path.join(DEMO_DIR,
                                                                                                       "base_model"))
            pad = padding_fraction(RunConfig(**{**cfg.to_dict(), "num_workers": 0}), args.steps)
            t = train(cfg).summary["timing"]
            results.append((name, pad, t["tokens_per_s_per_gpu"], t["phase_seconds"]["data"] / t["step_seconds"],
                            t["step_seconds"]))
    base = results[0][2]
    print(f"{args.samples} samples, {args.steps} steps of micro-batch {args.micro_batch}, {args.num_workers} workers")
    print(f"{'arm':20s} {'padding':>8s} {'tokens/s':>9s} {'vs first':>9s} {'data wait':>10s} {'step s':>7s}")
    for name, pad, tps, wait, step in results:
        print(f"{name:20s} {pad:8.3f} {tps:9.0f} {tps / base:9.2f} {wait:10.3%} {step:7.3f}")


if __name__ == "__main__":
    main()
