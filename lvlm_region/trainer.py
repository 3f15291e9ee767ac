"""One training loop for both stages: config -> region -> model -> data -> DeepSpeed engine -> steps -> save.

Stage 1 and stage 2 differ only in their RunConfig (region, data, template, learning rate, ZeRO stage).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoProcessor

from . import demo, engine as E, regions
from .config import DEMO_DIR, RunConfig
from .data import DummyImage, ImageTextDataset, Tokenized, build_dataset, check_images, get_template, make_loader, to_device
from .evaluate import evaluate
from .model import (apply_region, image_seq_length, load_model, load_projector, num_decoder_layers,
                    save_projector,
                    token_loss_sum, valid_tokens)

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    import datasets
    import deepspeed
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__}


@dataclass
class Setup:
    """Everything a run needs before its first step."""

    cfg: RunConfig
    region: regions.Region
    precision: str
    ds_config: dict
    processor: object
    tok: Tokenized
    dummy: DummyImage


def prepare(cfg: RunConfig) -> Setup:
    """Validate everything that can be checked without loading weights: config, region, DeepSpeed JSON, data."""
    cfg.resolve()
    E.init_distributed()
    if cfg.is_demo:
        if E.rank() == 0:
            demo.ensure(DEMO_DIR)
        E.barrier()
        if E.rank() == 0 and cfg.stage == "sft" and cfg.init is None:
            log.info("no --init given: stage 2 starts from the embedded demo model's random projector "
                     "(run launch/pretrain.py first and pass --init to start from a trained one)")
    if not os.path.isfile(os.path.join(cfg.model_path, "config.json")):
        raise FileNotFoundError(f"--model {cfg.model_path}: no config.json; give a local transformers checkpoint dir")
    model_config = AutoConfig.from_pretrained(cfg.model_path)
    region = regions.resolve(cfg.region, num_decoder_layers(model_config))
    precision = E.resolve_precision(cfg.precision)
    ds_config = E.build_ds_config(cfg.zero, cfg.ds_config, cfg.micro_batch, cfg.grad_accum, cfg.grad_clip, precision)
    processor = AutoProcessor.from_pretrained(cfg.model_path)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {cfg.model_path} has no pad token; set one and save it")
    tok = Tokenized(tokenizer=tokenizer, image_token_id=model_config.image_token_id,
                    n_image_tokens=image_seq_length(model_config), template=get_template(cfg.template),
                    max_length=cfg.max_length)
    dummy = DummyImage(tok.image_token_id, tok.n_image_tokens, model_config.vision_config.image_size)
    return Setup(cfg, region, precision, ds_config, processor, tok, dummy)


def loader(ds, s: "Setup", shuffle: bool, drop_last: bool, left_pad: bool = False):
    """A rank's loader; batches without images get the masked dummy image (data.collate)."""
    return make_loader(ds, s.cfg.micro_batch, s.tok.tokenizer.pad_token_id, E.rank(), E.world_size(), s.cfg.seed,
                       shuffle, drop_last, s.cfg.num_workers, left_pad, s.dummy)


def train(cfg: RunConfig) -> "Result":
    """Run one stage end to end; returns the run.json summary and the engine."""
    s = prepare(cfg)
    rank0 = E.rank() == 0
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    seed_everything(cfg.seed)

    train_ds = build_dataset(cfg.data, s.tok)
    check_images(train_ds, cfg.image_folder)
    cfg.dataset_size = len(train_ds)
    eval_ds = build_dataset(cfg.eval_data, s.tok) if cfg.eval_data else None
    eval_folder = os.path.dirname(os.path.abspath(cfg.eval_data)) if cfg.eval_data else None
    if eval_ds is not None:
        check_images(eval_ds, eval_folder)

    dtype = E.torch_dtype(s.precision)
    model = load_model(cfg.model_path, dtype)
    if cfg.init:
        load_projector(model, cfg.init)  # before DeepSpeed partitions anything
    counts = apply_region(model, s.region)  # before the optimizer exists
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if rank0:
        log.info("region %s -> layers %s of %d; parts %s", s.region.spec, list(s.region.layers),
                 s.region.num_layers, {k: v for k, v in s.region.parts.items()})
        for part, c in counts.items():
            log.info("  %-10s trainable %12d / %12d", part, c["trainable"], c["total"])

    image_processor = s.processor.image_processor
    train_loader = loader(ImageTextDataset(train_ds, cfg.image_folder, image_processor), s, shuffle=True,
                          drop_last=True)
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_ds)} samples give no full step of micro_batch {cfg.micro_batch} x grad_accum "
                         f"{cfg.grad_accum} x {E.world_size()} ranks; lower the batch or add data")
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_ratio * total)
    engine, scheduler = E.initialize(model, s.ds_config, cfg.lr, cfg.weight_decay, total, warmup)
    device = E.device()

    summary = {"status": "running", "config": cfg.to_dict(), "region": s.region.to_dict(), "parameters": counts,
               "world_size": E.world_size(), "precision": s.precision, "ds_config": s.ds_config,
               "steps": total, "steps_per_epoch": steps_per_epoch, "versions": versions(),
               "device": str(device)}
    if rank0:
        _write_json(os.path.join(out, "run.json"), summary)
    metrics = open(os.path.join(out, "metrics.jsonl"), "w") if rank0 else None

    def batches():
        epoch = 0
        while True:
            train_loader.sampler.set_epoch(epoch)
            yield from train_loader
            epoch += 1

    it = batches()
    engine.train()
    bar = tqdm(total=total, desc=cfg.stage, disable=not rank0, dynamic_ncols=True)
    window_tokens, window_start, loss = 0.0, time.perf_counter(), float("nan")
    for step in range(1, total + 1):
        micro = [to_device(next(it), device, dtype) for _ in range(cfg.grad_accum)]
        n_valid, n_tokens = E.all_reduce_sum([sum(valid_tokens(b["labels"]) for b in micro),
                                              sum(int(b["attention_mask"].sum()) for b in micro)])
        # Grads end up as (sum of token losses over all ranks and micro-steps) / n_valid: DeepSpeed divides by
        # grad_accum and averages over ranks, so each micro-step's sum is scaled by world * grad_accum / n_valid.
        scale = E.world_size() * cfg.grad_accum / max(n_valid, 1.0)
        loss_sum = 0.0
        for b in micro:
            logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            pixel_values=b.get("pixel_values")).logits
            lsum = token_loss_sum(logits, b["labels"])
            engine.backward(lsum * scale)
            engine.step()
            loss_sum += float(lsum.detach())
        loss = E.all_reduce_sum([loss_sum])[0] / max(n_valid, 1.0)
        window_tokens += n_tokens
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            elapsed = time.perf_counter() - window_start
            rec = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": _float(engine.get_global_grad_norm()), "tokens_per_s": window_tokens / elapsed}
            window_tokens, window_start = 0.0, time.perf_counter()
            if rank0:
                bar.write(f"step {step}/{total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                          f"grad_norm {rec['grad_norm']:.3f} | tok/s {rec['tokens_per_s']:.0f}")
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
    bar.close()
    summary["final_loss"] = loss

    save(engine, s.processor, out)
    if eval_ds is not None:
        summary["eval"] = evaluate(engine, eval_ds, eval_folder, s, cfg, dtype, device)
        if rank0:
            log.info("held-out loss %.4f | answer accuracy %.3f (%d/%d)", summary["eval"]["loss"],
                     summary["eval"]["accuracy"], summary["eval"]["correct"], summary["eval"]["samples"])
            metrics.write(json.dumps({"step": total, "eval": summary["eval"]}) + "\n")
    summary["status"] = "complete"
    if rank0:
        metrics.close()
        _write_json(os.path.join(out, "run.json"), summary)
    E.barrier()
    return Result(summary, engine)


@dataclass
class Result:
    summary: dict  # what run.json holds
    engine: object  # the DeepSpeed engine after training (for callers that inspect the weights)


def save(engine, processor, out: str) -> None:
    """Write the model in transformers format (safetensors) with its processor; gathers ZeRO-3 shards."""
    state = E.full_state_dict(engine)  # every rank takes part in the gather
    if E.rank() == 0:
        engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
        save_projector(engine.module, state, out)
        processor.save_pretrained(out)
        log.info("saved model and processor to %s", out)
    E.barrier()


def _float(x) -> float:
    return float(x) if x is not None else float("nan")


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)
