"""Logits at the trained positions only (logits_to_keep=loss_positions) vs full [B, T, V] logits, side by side.

    python bench/loss_positions.py            # Llama-3's vocabulary (128,256), 8 x 640 tokens, 48 trained per row

An LVLM batch trains on a small part of its positions: the image tokens and the prompt only condition. With the
full logits the LM head runs on every position and [B, T, V] logits (and their gradient) exist; with
``logits_to_keep`` (transformers' boolean mask) only the N trained positions reach the vocabulary. Each arm runs
in its own child process (so its peak resident memory is its own) on the same weights and batch: a small Llava
(LLM hidden 256, 2 layers, tiny CLIP tower) with a 128K vocabulary, fp32, forward + backward. Prints each arm's
median step time and peak RSS, their ratios, and that the losses agree.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def build(vocab: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    text = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=16)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=4,
                                                     vision_feature_layer=-2, image_seq_length=4, pad_token_id=0))


def arm(kept: bool, args) -> dict:
    from lvlm_region.model.loss import loss_positions, token_loss_sum
    model = build(args.vocab)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, args.vocab, (args.batch, args.seq), generator=g)
    ids[:, 1:5] = 4  # the image's tokens
    labels = torch.full_like(ids, -100)
    labels[:, -args.trained:] = ids[:, -args.trained:]  # the reply at the end of each row
    pixels = torch.randn(args.batch, 3, 32, 32, generator=g)
    times, loss = [], None
    for i in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        extra = {"logits_to_keep": loss_positions(labels)} if kept else {}
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, **extra).logits
        loss = token_loss_sum(logits, labels)
        loss.backward()
        del logits
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "loss": float(loss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=640)
    p.add_argument("--trained", type=int, default=48, help="trained positions at the end of each row")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--arm", choices=["full", "kept"], help=argparse.SUPPRESS)  # a child process runs one arm
    args = p.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm == "kept", args)))
        return
    res = {}
    for name in ("full", "kept"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--arm", name], capture_output=True,
                             text=True, check=True).stdout
        res[name] = json.loads(out.strip().splitlines()[-1])
    f, k = res["full"], res["kept"]
    print(f"vocab {args.vocab}, {args.batch} x {args.seq} tokens, {args.trained} trained per row, fp32, CPU")
    for name, r in res.items():
        print(f"  {name:5s} logits: step {r['step_s']:.3f} s (median of {args.steps}), "
              f"peak RSS {r['peak_rss_gb']:.2f} GB, loss {r['loss']:.6f}")
    print(f"  kept / full: step time {k['step_s'] / f['step_s']:.3f}, "
          f"peak RSS {k['peak_rss_gb'] / f['peak_rss_gb']:.3f}; "
          f"losses agree: {abs(k['loss'] - f['loss']) <= 1e-4 * abs(f['loss'])}")


if __name__ == "__main__":
    main()
