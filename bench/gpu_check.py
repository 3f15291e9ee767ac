"""The prepared GPU check: what only a GPU can measure, in one command, for whoever is lent one.

    bash scripts/gpu_check.sh                        # on the lent GPU: installs .whl/ if needed, runs the check
    python bench/gpu_check.py --out DIR              # the check itself (sized for one H100 / H200: a few minutes)
    python bench/gpu_check.py --smoke --out DIR      # the same code paths on CPU at toy size (tests/test_gpu_check.py)

On a LLaMA-shaped LLaVA at random init (CLIP-L/14-336-shaped tower, ~1.4 B parameters; --smoke: a toy one), bf16,
real DeepSpeed ZeRO-2 engines on one rank, built by this project's own engine, region and LoRA code:
1. step time of full tuning, uniform25 and LoRA r 128 on uniform25, each with and without activation
   checkpointing (CUDA events; median after warm-up), beside the FLOP model's ratios; MFU and HFU of each against
   the GPU's dense bf16 peak (timing.peak_for_gpu);
2. each arm's peak memory (torch.cuda.max_memory_allocated, from an empty device) beside the planner's estimate for
   the same setting (model states + activations + recomputation, ZeRO-2, one rank; its allowance left out);
3. a mixed-length micro-batch's loss packed (flash-attn 2's varlen path when importable, else sdpa's packed
   sequences) against the same samples padded, and the tokens/s of each (forward + backward);
4. one fp16 step with DeepSpeed's loss scaling and one bf16 step: both losses and all weights finite;
and with flash-attn 2 importable, the step times of full and uniform25 again with it. Writes DIR/gpu_check.json
and DIR/gpu_check.md; nothing is downloaded. Exit status 0 when it ran (the verdicts are in the files), 2 on bad
input.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import statistics
import sys
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from lvlm_region.data.batches import collate, collate_packed
from lvlm_region.infra import timing
from lvlm_region.model import lora
from lvlm_region.model.families import flop_model
from lvlm_region.model.flops import BatchShape
from lvlm_region.model.load import enable_checkpointing
from lvlm_region.model.loss import loss_positions, token_loss_sum
from lvlm_region.model.regions import resolve
from lvlm_region.model.trainable import apply_region
from lvlm_region.train import engine, plan

IMAGE_TOKEN, PAD = 3, 0
SIZES = {
    # ~1.1 B LLaMA-shaped LLM (TinyLlama's shape at 16 layers) + CLIP-L/14-336's tower: ~1.4 B parameters
    "gpu": dict(hidden=2048, intermediate=5632, layers=16, heads=16, vocab=32000, seq=2048, batch=2, warmup=2,
                steps=5, lora_r=128, vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=336, patch_size=14)),
    "smoke": dict(hidden=64, intermediate=176, layers=4, heads=4, vocab=512, seq=96, batch=2, warmup=1, steps=2,
                  lora_r=8, vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=28, patch_size=14)),
}
ARMS = (("full", "full"), ("uniform25", "full"), ("uniform25", "lora"))
log = logging.getLogger("gpu_check")


def model_config(z: dict) -> LlavaConfig:
    v = CLIPVisionConfig(**z["vision"])
    text = LlamaConfig(vocab_size=z["vocab"], hidden_size=z["hidden"], intermediate_size=z["intermediate"],
                       num_hidden_layers=z["layers"], num_attention_heads=z["heads"], num_key_value_heads=z["heads"],
                       max_position_embeddings=max(4096, z["seq"]), pad_token_id=PAD)
    return LlavaConfig(vision_config=v, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=(v.image_size // v.patch_size) ** 2,
                       pad_token_id=PAD)


def build(cfg: LlavaConfig, attn: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """The model at the same random init every time, on the device, in ``dtype``."""
    torch.manual_seed(0)
    with torch.device(engine.device()):
        model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation(attn)
    return model.to(dtype).train()


def sample(cfg: LlavaConfig, length: int, g: torch.Generator, dtype: torch.dtype) -> dict:
    """One sample of ``length`` tokens: its image's tokens first, then text; every label trained but the first."""
    n, side = cfg.image_seq_length, cfg.vision_config.image_size
    ids = torch.cat([torch.full((n,), IMAGE_TOKEN), torch.randint(10, cfg.text_config.vocab_size, (length - n,),
                                                                  generator=g)])
    labels = ids.clone()
    labels[: n + 1] = -100
    return {"input_ids": ids, "labels": labels, "n_images": 1,
            "pixel_values": torch.randn(1, 3, side, side, generator=g).to(dtype)}


def to_device(batch: dict) -> dict:
    return {k: v.to(engine.device()) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def loss_of(model, batch: dict) -> torch.Tensor:
    """The trainer's loss: the LM head on the trained positions only, the mean over them."""
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values")
    out = model(**{k: batch[k] for k in keys if k in batch}, logits_to_keep=loss_positions(batch["labels"]))
    return token_loss_sum(out.logits, batch["labels"]) / (batch["labels"][:, 1:] != -100).sum()


def planned_bytes(config_dir: str, z: dict, spec: str, tuner: str, ckpt: bool) -> dict:
    """The planner's memory for the arm: ZeRO-2, one rank, bf16, the arm's micro-batch and sequence length."""
    s = plan.Setting(model=config_dir, region=spec, tuner=tuner, lora_r=z["lora_r"], lora_alpha=2 * z["lora_r"],
                     lora_dropout=0.0, gpus=1, global_batch=z["batch"], seq_len=z["seq"],
                     trained_fraction=(z["seq"] - z["vision_tokens"] - 1) / z["seq"])
    shapes = plan.Shapes(s)
    states = timing.model_states(shapes.total, shapes.trainable(spec), 2, 1, "bf16", False,
                                 largest=shapes.largest)["total_on_device"]
    acts, recompute = shapes.activations(spec, ckpt, z["batch"])
    return {"model_states": states, "activations": acts, "recompute": recompute, "total": states + acts + recompute}


def run_arm(cfg, z: dict, spec: str, tuner: str, ckpt: bool, attn: str, precision: str, batch: dict,
            peak: float) -> dict:
    """Build the arm's engine from an empty device, step it, and report step time, FLOPs, MFU, memory, loss."""
    dtype = engine.torch_dtype(precision)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    model = build(cfg, attn, dtype)
    region = resolve(spec, z["layers"])
    if tuner == "lora":
        lora.inject(model, lora.peft_config(model, region, z["lora_r"], 2 * z["lora_r"], 0.0))
    apply_region(model, region, tuner)
    if ckpt:
        enable_checkpointing(model)
    ds_config = engine.build_ds_config(2, None, z["batch"], 1, 1.0, precision)
    eng, _ = engine.initialize(model, ds_config, lr=1e-5, weight_decay=0.0, total_steps=10 ** 6, warmup_steps=0)
    shape = BatchShape(z["batch"], z["seq"], z["batch"], head_tokens=int((batch["labels"][:, 1:] != -100).sum()))
    flops = flop_model(model).micro_batch(shape)
    times, losses, timer = [], [], timing.StepTimer()  # the run's own step timer: CUDA events on GPU
    for i in range(z["warmup"] + z["steps"]):
        timer.start()
        loss = loss_of(eng, batch)
        eng.backward(loss)
        eng.step()
        t = timer.finish()["step"]
        losses.append(float(loss.detach()))
        if i >= z["warmup"]:
            times.append(t)
    step = statistics.median(times)
    out = {"region": spec, "tuner": tuner, "grad_ckpt": ckpt, "attn": attn, "precision": precision,
           "step_s": step, "model_flops": flops.model, "hardware_flops": flops.hardware,
           "mfu": flops.model / (step * peak), "hfu": flops.hardware / (step * peak),
           "tokens_per_s": z["batch"] * z["seq"] / step, "losses": losses,
           "finite": all(math.isfinite(x) for x in losses)}
    if torch.cuda.is_available():
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - before
    engine.release(eng)
    del eng, model
    return out


def packed_vs_padded(cfg, z: dict, attn: str, dtype: torch.dtype) -> dict:
    """The same mixed-length samples as one padded micro-batch and as one packed row: losses and tokens/s."""
    g = torch.Generator().manual_seed(2)
    seq, n = z["seq"], cfg.image_seq_length
    lengths = [seq, n + (seq - n) * 3 // 4, n + (seq - n) // 2, n + (seq - n) // 4]
    samples = [sample(cfg, length, g, dtype) for length in lengths]
    model = build(cfg, attn, dtype)
    apply_region(model, resolve("uniform25", z["layers"]), "full")
    out = {"attn": attn, "lengths": lengths, "path": "flash-attn 2 varlen" if attn == "flash_attention_2" else
           "sdpa packed sequences (block-diagonal mask)"}
    for name, batch in (("padded", collate(samples, PAD)), ("packed", collate_packed(samples))):
        batch = to_device(batch)
        times, timer = [], timing.StepTimer()
        for i in range(1 + z["steps"]):
            timer.start()
            loss = loss_of(model, batch)
            loss.backward()
            t = timer.finish()["step"]
            model.zero_grad(set_to_none=True)
            if i:
                times.append(t)
        out[name] = {"loss": float(loss.detach()), "tokens_per_s": sum(lengths) / statistics.median(times),
                     "row_tokens": int(batch["input_ids"].numel())}
    out["relative_loss_difference"] = abs(out["packed"]["loss"] - out["padded"]["loss"]) / abs(out["padded"]["loss"])
    del model
    return out


def loss_scaled_step(cfg, z: dict, attn: str, precision: str, batch: dict) -> dict:
    """One step of a uniform25 engine in ``precision``: finite loss and weights (fp16: DeepSpeed's loss scaling)."""
    dtype = engine.torch_dtype(precision)
    batch = {k: v.to(dtype) if k == "pixel_values" else v for k, v in batch.items()}
    model = build(cfg, attn, dtype)
    apply_region(model, resolve("uniform25", z["layers"]), "full")
    eng, _ = engine.initialize(model, engine.build_ds_config(2, None, z["batch"], 1, 1.0, precision), lr=1e-5,
                               weight_decay=0.0, total_steps=10, warmup_steps=0)
    loss = loss_of(eng, batch)
    eng.backward(loss)
    eng.step()
    out = {"precision": precision, "loss": float(loss.detach()),
           "weights_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad),
           "loss_scale": float(eng.optimizer.cur_scale) if hasattr(eng.optimizer, "cur_scale") else None}
    out["finite"] = math.isfinite(out["loss"]) and out["weights_finite"]
    engine.release(eng)
    return out


def report(result: dict) -> str:
    """gpu_check.md: the tables a person reads."""
    r = result
    lines = [f"# GPU check ({r['mode']}), {r['date']}", "", f"device: {r['device']}; peak {r['peak_tflops']:.0f} "
             f"TFLOP/s ({r['peak_source']}); versions: {json.dumps(r['versions'])}", "",
             f"model: {r['parameters'] / 1e6:,.1f} M parameters, micro-batch {r['size']['batch']} x "
             f"{r['size']['seq']} tokens, ZeRO-2 on one rank", "",
             "| region | tuner | grad ckpt | attn | step s | MFU | HFU | tokens/s | peak memory GiB | planner GiB "
             "| measured / planned |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in r["arms"]:
        mem, planned = a.get("peak_memory_bytes"), a["planned"]["total"] / 2 ** 30
        memory = (f"{mem / 2 ** 30:.2f} | {planned:.2f} | {mem / 2 ** 30 / planned:.3f}" if mem else
                  f"- | {planned:.2f} | -")
        lines.append(f"| {a['region']} | {a['tuner']} | {'yes' if a['grad_ckpt'] else 'no'} | {a['attn']} | "
                     f"{a['step_s']:.3f} | {a['mfu']:.3f} | {a['hfu']:.3f} | {a['tokens_per_s']:.0f} | {memory} |")
    lines += ["", "| ratio (to full, same checkpointing) | measured | FLOP model | measured / model |",
              "|---|---|---|---|"]
    for x in r["ratios"]:
        lines.append(f"| {x['arm']} | {x['measured']:.3f} | {x['model']:.3f} | {x['measured'] / x['model']:.3f} |")
    p = r["packing"]
    lines += ["", f"packed vs padded ({p['path']}, lengths {p['lengths']}): loss {p['packed']['loss']:.5f} vs "
              f"{p['padded']['loss']:.5f} (relative difference {p['relative_loss_difference']:.2e}); tokens/s "
              f"{p['packed']['tokens_per_s']:.0f} vs {p['padded']['tokens_per_s']:.0f}", ""]
    for s in r["precision_steps"]:
        lines.append(f"{s['precision']} step: loss {s['loss']:.4f}, weights finite {s['weights_finite']}, loss scale "
                     f"{s['loss_scale']}: {'finite' if s['finite'] else 'NOT FINITE'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", required=True, help="where gpu_check.json and gpu_check.md go")
    p.add_argument("--smoke", action="store_true", help="toy size on whatever device there is (CPU here)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no GPU here; run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    z = dict(SIZES["smoke" if args.smoke else "gpu"])
    if args.smoke and not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator reports fp16 unsupported on CPUs without AVX512-FP16 and its engine refuses it;
        # the smoke run overrides that one answer (as tests/helpers/fp16_on_cpu.py) so the fp16 path runs here too
        from deepspeed.accelerator import get_accelerator
        get_accelerator().is_fp16_supported = lambda: True
    engine.init_distributed()
    cfg = model_config(z)
    z["vision_tokens"] = cfg.image_seq_length
    config_dir = os.path.join(args.out, "model")
    cfg.save_pretrained(config_dir)  # the planner reads only this
    precision = engine.resolve_precision("bf16")
    dtype = engine.torch_dtype(precision)
    if torch.cuda.is_available():
        peak, source = timing.peak_for_gpu(torch.cuda.get_device_name())
    else:
        peak, source = timing.peak_flops(None, dtype)
    flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    g = torch.Generator().manual_seed(1)
    batch = to_device(collate([sample(cfg, z["seq"], g, dtype) for _ in range(z["batch"])], PAD))
    arms = []
    for (spec, tuner) in ARMS:
        for ckpt in (False, True):
            t0 = time.time()
            a = run_arm(cfg, z, spec, tuner, ckpt, "sdpa", precision, batch, peak)
            a["planned"] = planned_bytes(config_dir, z, spec, tuner, ckpt)
            arms.append(a)
            log.warning("%s %s ckpt=%s: %.3f s/step (%.0f s)", spec, tuner, ckpt, a["step_s"], time.time() - t0)
    if flash:
        for spec in ("full", "uniform25"):
            a = run_arm(cfg, z, spec, "full", False, "flash_attention_2", precision, batch, peak)
            a["planned"] = planned_bytes(config_dir, z, spec, "full", False)
            arms.append(a)
    ratios = []
    for a in arms:
        if a["region"] == "full" or a["attn"] != "sdpa":
            continue
        base = next(b for b in arms if b["region"] == "full" and b["grad_ckpt"] == a["grad_ckpt"]
                    and b["attn"] == a["attn"])
        key = "hardware_flops" if a["grad_ckpt"] else "model_flops"
        ratios.append({"arm": f"{a['region']} {a['tuner']}{' ckpt' if a['grad_ckpt'] else ''}",
                       "measured": a["step_s"] / base["step_s"], "model": a[key] / base[key]})
    packing = packed_vs_padded(cfg, z, "flash_attention_2" if flash else "sdpa", dtype)
    steps = [loss_scaled_step(cfg, z, "sdpa", prec, batch) for prec in ("fp16", precision)]
    total = plan.Shapes(plan.Setting(model=config_dir)).total  # counted on the meta device
    result = {"mode": "smoke" if args.smoke else "gpu", "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "peak_tflops": peak / 1e12, "peak_source": source, "versions": engine.versions(),
              "size": {k: v for k, v in z.items() if k != "vision"}, "parameters": total, "flash_attn": flash,
              "arms": arms, "ratios": ratios,
              "packing": packing, "precision_steps": steps}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(report(result))
    print(report(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
