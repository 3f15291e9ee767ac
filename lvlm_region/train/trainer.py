"""One training loop for both stages: ``setup`` (everything checkable before weights load), then ``Trainer``:
data -> model and DeepSpeed engine -> run.json and metrics -> one ``step`` per optimizer step -> ``finish``
(export, evaluation and run.json; shared by a normal end and a stop request).

Stage 1 and stage 2 differ only in their RunConfig (region, data, template, learning rate, ZeRO stage).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..config import RESUME_MAY_CHANGE, RunConfig, trackers
from ..data import prepare
from ..data.batches import BatchStream, ImageTextDataset, run_loader, to_device
from ..infra import outputs, timing, tracking
from ..model import families, lora
from ..model.flops import BatchShape
from ..model.image_inputs import ImageLayout
from ..model.load import enable_checkpointing, load_model, skeleton
from ..model.loss import loss_positions, router_loss, token_loss_sum, valid_tokens
from ..model.regions import Region
from ..model.projector import PROJECTOR_FILE, export_projector, import_projector, load_projector
from ..model.trainable import apply_region, largest_module, projector_parameters
from . import checkpoint, engine
from .held_out import evaluate
from .run_setup import Setup, obtain_data, plan_run, setup

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig) -> "Result":
    """Run one stage end to end (or continue it from a checkpoint); returns the run.json summary and the engine."""
    session_start = time.perf_counter()
    timing.reset_peak_memory()
    try:
        s = setup(cfg)
    except checkpoint.AlreadyComplete as done:  # a requeued job of a finished run: touch nothing
        if engine.rank() == 0:
            log.info("%s", done)
        return Result(done.summary, None, nothing_to_do=True)
    run = Trainer(s, session_start)
    for step in range(run.start_step + 1, run.total + 1):
        stops = run.step(step)
        if stops:
            return run.finish(step, stopped=True)
    return run.finish(run.total, stopped=False)


class Trainer:
    """One stage's run. Constructing it does everything before the first step, in the one order that works (each
    phase reads what the one before it set): the output directory and the seeds, then the data and step count
    (``_load_data``), the model and the DeepSpeed engine (``_build``), run.json, metrics and timers (``_start``).
    Then ``step`` once per optimizer step and ``finish`` once; nothing else is called from outside."""

    def __init__(self, s: Setup, session_start: float):
        self.s, self.cfg, self.session_start = s, s.cfg, session_start
        self.rank0 = engine.rank() == 0
        self.out = s.cfg.output_dir
        self.prior = {"step": 0, "data": {"epoch": 0, "consumed": 0}, "time": {"elapsed_s": 0.0, "gpu_seconds": 0.0}}
        cfg, resume_from = self.cfg, s.resume_from
        if cfg.resume == "auto" and resume_from is None and self.rank0:
            log.info("--resume auto: no checkpoint in %s yet; starting from step 0", self.out)
        os.makedirs(self.out, exist_ok=True)
        if resume_from is None and cfg.overwrite and self.rank0:  # the replaced run's files and checkpoints, set aside
            checkpoint.set_aside_all(self.out)
            checkpoint.set_aside_run(self.out)
        engine.barrier()
        seed_everything(cfg.seed)
        self._load_data()
        self._build()
        self._start()

    def _load_data(self) -> None:
        """The prepared data sets, the training loader and the step count; a resumed run's state is checked
        against this run's identity before any weights load."""
        cfg, s = self.cfg, self.s
        train_ds, train_folder = obtain_data(cfg.data, cfg.image_folder, "train", s)
        # --plan auto, before the loader reads micro_batch
        self.plan = plan_run(s, train_ds, train_folder) if cfg.plan == "auto" else None
        self.dataset_size = len(train_ds)
        self.eval_ds, self.eval_folder = (obtain_data(cfg.eval_data, cfg.image_folder, "eval", s) if cfg.eval_data
                                          else (None, None))
        self.text_ds = obtain_data(cfg.text_eval_data, None, "text", s)[0] if cfg.text_eval_data else None
        self.loader = run_loader(ImageTextDataset(train_ds, train_folder, s.load_image, s.encoding.layout), cfg,
                                 s.tokenizer.pad_token_id, s.encoding.layout.dummy(), engine.rank(),
                                 engine.world_size(), shuffle=True, drop_last=True, training=True)
        self.steps_per_epoch = len(self.loader) // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(train_ds)} samples give no full step of micro_batch {cfg.micro_batch} x "
                             f"grad_accum {cfg.grad_accum} x {engine.world_size()} ranks; lower the batch or add data")
        self.total = cfg.max_steps or math.ceil(cfg.epochs * self.steps_per_epoch)
        self.identity = run_identity(cfg, s, self.total, self.dataset_size)
        if s.resume_from is not None:
            self.prior = checkpoint.read_state(s.resume_from)
            checkpoint.check_compatible(self.prior["identity"], self.identity, s.resume_from)

    def _build(self) -> None:
        """The model (weights, projector, LoRA, region, checkpointing) and the DeepSpeed engine around it. A moving
        region (--region-schedule) applies the period of the last completed step: a resumed run continues in the
        period its checkpoint's optimizer state belongs to (step() moves on at the next period's first step)."""
        cfg, s = self.cfg, self.s
        self.dtype = engine.torch_dtype(s.precision)
        self.period = s.schedule.period(self.prior["step"]) if s.schedule else None
        model, self.adapters, self.counts = build_model(s, self.dtype, s.schedule.region(self.period)
                                                        if s.schedule else None)
        self.model = model
        offload = engine.optimizer_offload(s.ds_config) != "none"
        self.mem = timing.model_states(self.counts["all"]["total"], self.counts["all"]["trainable"],
                                       engine.zero_stage(s.ds_config), engine.world_size(), s.precision, offload,
                                       largest=largest_module(model))
        if self.rank0:
            mem = self.mem
            log.info("model state per rank (estimate, before activations): weights %.3f GB, gradients %.3f GB, "
                     "optimizer %.3f GB%s; total on device %.3f GB", mem["weights"] / 1e9, mem["gradients"] / 1e9,
                     mem["optimizer"] / 1e9, " (offloaded to CPU)" if offload else "", mem["total_on_device"] / 1e9)
        self.warmup = int(cfg.warmup_ratio * self.total)
        self.part_rates = cfg.part_lrs()  # --lr-groups
        self.engine, self.scheduler = self._engine(done_steps=0)
        if self.rank0 and self.lr_groups:
            log.info("learning rates per part (--lr-groups; the rest at --lr %g): %s", cfg.lr,
                     ", ".join(f"{k} {v['lr']:g} ({v['tensors']} tensors)" for k, v in self.lr_groups.items()))
        self.device = engine.device()
        self.stream = BatchStream(self.loader)
        self.rng_states = None
        if s.resume_from is not None:
            self.rng_states = checkpoint.load(self.engine, s.resume_from)
            self.stream.load_state_dict(self.prior["data"])
            if self.rank0:
                log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", s.resume_from, self.prior["step"],
                         self.prior["data"]["epoch"], self.prior["data"]["consumed"])

    def _engine(self, done_steps: int):
        """(DeepSpeed engine, LR scheduler) for the model's trainable set as it is now, the schedule at
        ``done_steps`` completed steps; the parts with their own LR in their own groups (run.json lr_groups)."""
        cfg = self.cfg
        rates = {part: lr for part, lr in self.part_rates.items() if part != "projector"}
        if "projector" in self.part_rates or cfg.projector_lr != cfg.lr:  # --lr-groups' or --projector-lr
            rates["projector"] = cfg.projector_lr
        groups = part_groups(self.model, rates)  # the rest trains at --lr
        # --lr-groups as the optimizer got them (run.json): each part's peak LR and what it holds
        self.lr_groups = {part: {"lr": lr, "tensors": len(params), "parameters": sum(p.numel() for p in params)}
                          for part, params, lr in groups if part != "projector" or part in self.part_rates}
        return engine.initialize(self.model, self.s.ds_config, cfg.lr, cfg.weight_decay, self.total, self.warmup,
                                 lr_overrides=[(params, lr) for _, params, lr in groups], done_steps=done_steps)

    def switch(self, period: int, step: int) -> None:
        """A moving region's next period, before its first step: the engine is rebuilt around the period's trainable
        set (DeepSpeed fixes its parameter groups at initialize; changing requires_grad under a built engine is
        ignored, and under ZeRO-3 silently so). The weights stay (they live in the model's parameters, partitions
        included); the LR schedule continues at ``step``; Adam's state restarts for every parameter, as LISA's
        re-created optimizer has it, and the previous period's optimizer state is freed. Under bf16 / fp16 the fp32
        master weights of what trains on both sides of the switch (the projector, layers drawn again) carry over; a
        layer that returns later starts from its 16-bit weights."""
        old, self.engine = self.engine, None
        held = engine.optimizer_params(old)
        self.period = period
        region = self.s.schedule.region(period)
        self.counts = apply_region(self.model, region, self.cfg.tuner)  # the old engine is not stepped again
        staying = [p for p in held if p.requires_grad]
        masters = engine.master_weights(old, staying)
        engine.release(old, model_continues=True)
        del old, held
        gc.collect()  # the old engine and its optimizer state, now that nothing here holds them
        self.engine, self.scheduler = self._engine(done_steps=step - 1)
        engine.set_master_weights(self.engine, staying, masters)
        self.engine.train()
        self.flop_model = families.flop_model(self.engine.module)  # this period's trainable set
        if self.rank0:
            log.info("region schedule %s: period %d (steps %d-%d) trains layers %s; optimizer rebuilt for %d "
                     "trainable parameters, Adam state reset", self.s.schedule.text, period, step,
                     min(step + self.s.schedule.every - 1, self.total), list(region.layers),
                     self.counts["all"]["trainable"])

    def _start(self) -> None:
        """run.json (status running), metrics.jsonl, the stop handler, the FLOP model and the timers."""
        cfg, s = self.cfg, self.s
        self.start_step = self.prior["step"]
        self.previous = s.resume_from.name if s.resume_from is not None else None  # the checkpoint continued
        self.replaced = self.prior.get("images_replaced", 0)  # samples whose image failed to decode, all ranks
        self.router_loss: float | None = None  # MoE: the last step's load-balancing loss (loss.router_loss)
        self.summary = {
            "status": "running", "config": cfg.to_dict(), "region": s.region.to_dict(), "parameters": self.counts,
            "world_size": engine.world_size(), "precision": s.precision, "attn": s.attn, "ds_config": s.ds_config,
            "steps": self.total, "steps_per_epoch": self.steps_per_epoch, "dataset_size": self.dataset_size,
            "versions": engine.versions(), "device": str(self.device), "device_name": timing.device_name(),
            "memory_estimate": self.mem, "plan": self.plan, "ranks": engine.all_placements(),
            **({"lr_groups": self.lr_groups} if self.lr_groups else {}),
            **({"region_schedule": s.schedule.to_dict(self.total)} if s.schedule else {}),
            "resumed_from": str(s.resume_from) if s.resume_from else None}
        self.write_summary()
        st = os.stat(self.out)
        self.out_id = (st.st_dev, st.st_ino)  # output_lost compares against it every step
        self.metrics = open_metrics(os.path.join(self.out, "metrics.jsonl"), self.start_step) if self.rank0 else None
        self.trackers = (tracking.Trackers(trackers(cfg.report_to), self.out, cfg.to_dict(), self.start_step)
                         if self.rank0 else None)  # --report-to: the same records, after metrics.jsonl has them
        self.stop = checkpoint.StopRequest(self.out)
        self.flop_model = families.flop_model(self.engine.module)  # trainable set and checkpointing as they are now
        self.peak, self.peak_source = timing.peak_flops(cfg.peak_tflops, self.dtype) if self.rank0 else (0.0, "")
        self.timer = timing.StepTimer()
        self.totals = timing.Totals(warmup=min(5, max(1, (self.total - self.start_step) // 10)))
        self.totals.restore(self.prior.get("totals"))
        self.window = timing.Totals(warmup=0)
        self.engine.train()
        self.bar = tqdm(total=self.total, initial=self.start_step, desc=cfg.stage, disable=not self.rank0,
                        dynamic_ncols=True)
        self.loss, self.grad_norm = float("nan"), None
        self.window_losses: list[tuple[int, float]] = []  # (step, loss) since the last metrics record
        self.last_window: dict | None = None  # the mean loss of the last logged window (run.json final_loss_mean)
        if self.rng_states is not None:
            # Last, right before the first step: the RNGs continue exactly where the checkpoint left them (LoRA
            # dropout draws from them). Set earlier, anything that draws in between (a random matrix, a model
            # init) would shift every dropout mask after a resume.
            checkpoint.restore_rng(self.rng_states)

    def state(self, step: int) -> dict:
        """What a checkpoint at `step` records besides DeepSpeed's state (accumulated across restarts)."""
        wall = time.perf_counter() - self.session_start
        prior = self.prior["time"]
        return {"step": step, "data": self.stream.state_dict(), "identity": self.identity,
                "totals": self.totals.state_dict(), "images_replaced": self.replaced, "previous": self.previous,
                "time": {"elapsed_s": prior["elapsed_s"] + wall,
                         "gpu_seconds": prior["gpu_seconds"] + wall * engine.world_size()}}

    def write_summary(self) -> None:
        if self.rank0:
            outputs.write_json_atomic(os.path.join(self.out, "run.json"), self.summary)

    def step(self, step: int) -> bool:
        """One optimizer step (grad_accum micro-batches), its checks, metrics and checkpoint; whether to stop."""
        cfg, timer = self.cfg, self.timer
        timer.start()
        if self.s.schedule is not None and self.s.schedule.period(step) != self.period:
            with timer.phase("switch"):
                self.switch(self.s.schedule.period(step), step)
        ds_engine = self.engine
        skipped_before = ds_engine.skipped_steps
        with timer.phase("data"):
            micro = [to_device(next(self.stream), self.device, self.dtype) for _ in range(cfg.grad_accum)]
            n_valid = engine.all_reduce_sum([sum(valid_tokens(b["labels"]) for b in micro)])[0]
        # Grads end up as (sum of token losses over all ranks and micro-steps) / n_valid: DeepSpeed divides by
        # grad_accum and averages over ranks, so each micro-step's sum is scaled by world * grad_accum / n_valid.
        scale = engine.world_size() * cfg.grad_accum / max(n_valid, 1.0)
        loss_sum = router_sum = 0.0
        for b in micro:
            with timer.phase("forward"):
                # No KV cache in training; with one, transformers would not read restarting position ids as packing.
                out = ds_engine(**self.s.encoding.layout.model_inputs(b), logits_to_keep=loss_positions(b["labels"]),
                                use_cache=False)  # logits [N, V]: the trained positions only
                lsum = token_loss_sum(out.logits, b["labels"])
                # MoE: the router's load-balancing loss per micro-batch (DeepSpeed averages it over micro-steps
                # and ranks, as the model's own loss would have it per batch)
                router = router_loss(out, ds_engine.module.config)
            with timer.phase("backward"):
                ds_engine.backward(lsum * scale if router is None else lsum * scale + router)
            with timer.phase("optimizer"):
                ds_engine.step()
            loss_sum += float(lsum.detach())
            router_sum += 0.0 if router is None else float(router.detach())
        work = self.flop_model.step([shape for b in micro for shape in batch_shapes(b, self.s.encoding.layout)])
        with timer.phase("optimizer"):
            # One collective for the loss, the stop request, a lost output directory and the step's work: every
            # rank stops together.
            r = engine.all_reduce_named({
                "loss": loss_sum, "stops": float(self.stop.poll()), "lost": float(self.output_lost()),
                "tokens": sum(b["n_tokens"] for b in micro), "samples": sum(b["n_samples"] for b in micro),
                "images": sum(b["real_images"] for b in micro), "model_flops": work.model,
                "hardware_flops": work.hardware, "replaced": sum(b["replaced"] for b in micro), "router": router_sum})
        if r["lost"]:
            raise OutputLost(f"--output-dir {self.out} was deleted or replaced while the run was writing to it "
                             f"(noticed at step {step}); the run stopped, since nothing more it writes could be kept "
                             "there. Give the run an output directory nothing else removes, and rerun")
        stops = r["stops"]
        if router is not None:  # the mean over micro-steps and ranks, as the gradient has it
            self.router_loss = r["router"] / (engine.world_size() * cfg.grad_accum)
        self.replaced += int(r["replaced"])
        times = timer.finish()
        shape = (r["tokens"], r["samples"], r["images"], r["model_flops"], r["hardware_flops"])
        self.totals.add(times, *shape)
        self.window.add(times, *shape)
        self.loss = r["loss"] / max(n_valid, 1.0)
        self.window_losses.append((step, self.loss))
        self.grad_norm = ds_engine.get_global_grad_norm()  # global: every rank sees it, so all stop together
        self.check(step, skipped_before)
        self.bar.update(1)
        if step % cfg.log_every == 0 or step == self.total or stops:
            self.log_metrics(step)
        if stops or (cfg.save_every and (step % cfg.save_every == 0 or step == self.total)):
            self.checkpoint_path = checkpoint.save(ds_engine, self.out, step, self.state(step), cfg.keep_checkpoints)
            self.previous = self.checkpoint_path.name
        return bool(stops)

    def output_lost(self) -> bool:
        """Rank 0: whether the output directory is no longer the one the run started in (deleted, moved, replaced)."""
        if not self.rank0:
            return False
        try:
            st = os.stat(self.out)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self.out_id

    def check(self, step: int, skipped_before: int) -> None:
        """check_finite; on failure run.json says what happened and metrics.jsonl keeps the good steps."""
        try:
            check_finite(step, self.loss, self.grad_norm, self.engine, self.s.precision, skipped_before, self.out)
        except TrainingDiverged as e:
            self.summary.update(status="diverged", error=str(e), steps_done=step - 1, time=self.state(step - 1)["time"])
            self.write_summary()
            if self.rank0:
                self.metrics.close()
                self.trackers.close()
            raise

    def log_metrics(self, step: int) -> None:
        """One metrics.jsonl record and progress line over the steps since the last one."""
        cfg, world = self.cfg, engine.world_size()
        w = self.window.summary(world, self.peak or 1.0)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)  # every group follows the same schedule
        rec = {"step": step, "loss": self.loss, **({"router_loss": self.router_loss} if self.router_loss is not None
                                                    else {}), "lr": cfg.lr * factor,
               **({"projector_lr": cfg.projector_lr * factor} if cfg.projector_lr != cfg.lr else {}),
               **{f"{part}_lr": lr * factor for part, lr in self.part_rates.items() if part != "projector"},
               "grad_norm": _float(self.grad_norm),
               "tokens_per_s": w["tokens_per_s_per_gpu"] * world, "step_s": w["step_seconds"],
               **{f"{p}_s": v for p, v in w["phase_seconds"].items()},
               "tflops_per_step": w["model_tflops_per_step"],
               "mfu": w["mfu"] if self.rank0 else None, "peak_mem_gb": timing.peak_memory_bytes() / 1e9,
               **({"images_replaced": self.replaced} if self.replaced else {}),
               **fp16_state(self.engine, self.s.precision)}
        self.window = timing.Totals(warmup=0)
        losses = [x for _, x in self.window_losses]
        self.last_window = {"value": sum(losses) / len(losses), "first_step": self.window_losses[0][0],
                            "last_step": step, "steps": len(losses)}
        self.window_losses = []
        if self.rank0:
            self.bar.write(f"step {step}/{self.total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                           f"grad_norm {rec['grad_norm']:.3f} | tok/s {rec['tokens_per_s']:.0f} | "
                           f"step {rec['step_s']:.3f}s | mfu {rec['mfu']:.3f}")
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()
            self.trackers.log(rec, step)

    def finish(self, step: int, stopped: bool) -> "Result":
        """The end of a session, normal or stopped: a complete run exports and evaluates; both write run.json."""
        summary = self.summary
        self.bar.close()
        self.stop.clear_file()  # a request that came too late to act on must not stop the next run at once
        # final_loss: the last step's loss; final_loss_mean: the mean over the last logged window (--log-every
        # steps), less noisy; reports show the mean (report.py)
        summary.update(final_loss=self.loss, final_loss_mean=self.last_window, steps_done=step)
        if stopped:
            summary.update(status="interrupted", checkpoint=str(self.checkpoint_path),
                           stop_reason=self.stop.reason or "another rank was asked to stop")
            if self.rank0:
                log.info("stop requested (%s): checkpoint %s written at step %d; rerun with --resume auto",
                         summary["stop_reason"], self.checkpoint_path, step)
        else:
            self.complete()
        summary["timing"] = timing_summary(self.totals, self.peak, self.peak_source, self.mem)
        if not stopped and self.rank0:
            log.info("peak memory measured %.3f GB (%s) vs model-state estimate %.3f GB (activations not included)",
                     summary["timing"]["peak_memory_gb_rank0"], "process RSS" if engine.on_cpu() else "GPU allocator",
                     summary["timing"]["memory_estimate_gb"])
        summary["time"] = self.state(step)["time"]
        if self.rank0:
            self.metrics.close()
            self.trackers.close()
        self.write_summary()
        engine.barrier()
        self.stop.restore()
        return Result(summary, self.engine)

    def complete(self) -> None:
        """A run that reached its last step: export the model, evaluate it, status complete."""
        cfg, summary = self.cfg, self.summary
        summary.update(fp16_state(self.engine, self.s.precision))
        summary["images_replaced"] = self.replaced
        if self.replaced and self.rank0:
            log.warning("%d samples were replaced by the next one because an image failed to decode (see the "
                        "warnings above for the files)", self.replaced)
        if cfg.export_model:
            export_model(self.engine, self.s.processor, self.out, self.adapters)
        if self.eval_ds is not None:
            summary["eval"] = ev = evaluate(self.engine, self.eval_ds, self.eval_folder, self.s, cfg, self.dtype,
                                            self.device)
            if self.rank0:
                log.info("held-out loss %.4f | answer accuracy %.3f (%d/%d)", ev["loss"], ev["accuracy"],
                         ev["correct"], ev["samples"])
        if self.text_ds is not None:  # text retention: the same evaluation on text-only questions
            summary["text_eval"] = ev = evaluate(self.engine, self.text_ds, "", self.s, cfg, self.dtype, self.device)
            if self.rank0:
                log.info("text retention: answer accuracy %.3f (%d/%d) on text-only questions", ev["accuracy"],
                         ev["correct"], ev["samples"])
        if self.rank0 and (self.eval_ds is not None or self.text_ds is not None):  # one record: both evaluations
            rec = {"step": self.total, "eval": summary.get("eval"),
                   **({"text_eval": summary["text_eval"]} if self.text_ds is not None else {})}
            self.metrics.write(json.dumps(rec) + "\n")
            self.trackers.log(rec, self.total)
        summary["status"] = "complete"


def build_model(s: Setup, dtype: torch.dtype, trained: Region | None = None):
    """(model, LoRA config or None, per-part parameter counts): loaded (ZeRO-3: in partitions), its projector
    initialised, LoRA injected (on the region's layers), the region applied (before any optimizer exists; a moving
    region's ``trained``, its current period) and checkpointing enabled."""
    cfg = s.cfg
    loading = engine.PartitionedLoading(s.ds_config)  # ZeRO-3: built and loaded in partitions
    model = load_model(cfg.model_path, dtype, s.attn)
    if cfg.init:
        with loading.writable(projector_parameters(model)):  # whole on every rank while it is written
            load_projector(model, cfg.init)
    if s.projector is not None:
        with loading.writable(projector_parameters(model)):
            n = import_projector(model, s.projector)
        if engine.rank() == 0:
            log.info("imported %d projector tensors from %s", n, cfg.init_projector)
    loading.close()  # LoRA adapters made from here on are partitioned by deepspeed.initialize
    adapters = None
    if cfg.tuner == "lora":
        adapters = lora.peft_config(model, s.region, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                    base_path=os.path.abspath(cfg.model_path))
        lora.inject(model, adapters)
    counts = apply_region(model, trained or s.region, cfg.tuner)  # before the optimizer exists
    if cfg.grad_ckpt:
        enable_checkpointing(model)
    if engine.rank() == 0:
        log.info("region %s -> layers %s of %d; parts %s", s.region.spec, list(s.region.layers),
                 s.region.num_layers, {k: v for k, v in s.region.parts.items()})
        if s.schedule is not None:
            log.info("region schedule %s over these layers (Adam state reset at each switch); this period trains "
                     "layers %s", s.schedule.text, list(trained.layers))
        for part, c in counts.items():
            log.info("  %-10s trainable %12d / %12d", part, c["trainable"], c["total"])
        if adapters is not None:
            log.info("LoRA r=%d alpha=%d dropout=%g on %d linears of layers %s: %d adapter parameters (r x (in + out) "
                     "summed over them: %d)", cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                     len(adapters.target_modules), list(s.region.layers), counts["layers"]["trainable"],
                     lora.lora_parameter_count(adapters, model))
    return model, adapters, counts


class OutputLost(OSError):
    """The output directory disappeared (or was replaced) during the run: every rank stops at that step."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm (or fp16's loss scale at its floor): the run stops at that step."""


def check_finite(step: int, loss: float, grad_norm, ds_engine, precision: str, skipped_before: int,
                 out: str) -> None:
    """Stop the run (every rank alike: loss and grad norm are global) when this step's loss or gradient norm is not
    finite, before anything of this step is saved; every checkpoint on disk therefore had a finite loss.

    fp16: a step the loss scaler skipped (overflow: weights and schedule unchanged) is not a failure, unless the
    scale has fallen to its minimum (DeepSpeed would fail at the next overflow with less to say).
    """
    def last_good() -> str:  # only on failure: no file-system work on the steps that pass
        where = checkpoint.find_latest(out)
        return (f"the last good checkpoint is {where} (continue with --resume auto after changing what diverged)"
                if where else "no checkpoint was written before it (pass --save-every to keep one)")

    if precision == "fp16" and ds_engine.skipped_steps > skipped_before:
        scaler = getattr(ds_engine.optimizer, "loss_scaler", None)
        floor = getattr(scaler, "min_scale", None)
        if floor is not None and ds_engine.optimizer.loss_scale <= floor:
            raise TrainingDiverged(f"step {step}: fp16 gradients overflowed and the loss scale has fallen to its "
                                   f"minimum {floor:g}, so the steps that follow cannot apply either; {last_good()}. "
                                   "Use bf16, a lower --lr, or a lower min_loss_scale in the DeepSpeed JSON")
        return
    norm = float("nan") if grad_norm is None else float(grad_norm)
    if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(norm)):
        raise TrainingDiverged(f"step {step}: loss {loss} / gradient norm {norm} is not finite; the run stopped before "
                               f"saving anything of this step; {last_good()}. Lower --lr (now "
                               f"{ds_engine.get_lr()[0]:.3g}) or --grad-clip"
                               f"{', use bf16 instead of fp16' if precision == 'fp16' else ''}, or look for a bad "
                               "sample near this step")


def fp16_state(ds_engine, precision: str) -> dict:
    """fp16's dynamic loss scale and the optimizer steps DeepSpeed skipped on overflow (they move neither the weights
    nor the LR schedule; the loop still counts them as steps)."""
    if precision != "fp16":
        return {}
    return {"loss_scale": float(ds_engine.optimizer.loss_scale), "skipped_steps": int(ds_engine.skipped_steps)}


def timing_summary(totals: "timing.Totals", peak: float, peak_source: str, estimate: dict) -> dict:
    """Steady-state figures of the whole run (across restarts) for run.json; MFU on rank 0 only."""
    out = totals.summary(engine.world_size(), peak or float("nan"))
    out.update(peak_tflops_per_rank=peak / 1e12, peak_source=peak_source,
               peak_memory_gb_rank0=timing.peak_memory_bytes() / 1e9,
               memory_estimate_gb=estimate["total_on_device"] / 1e9)
    return out


def batch_shapes(batch: dict, layout: ImageLayout) -> list[BatchShape]:
    """The micro-batch as the FLOP model sees it: one padded block, or (packed) one block per sample, since
    attention stays within each sample. Its images: what the vision tower runs on, the masked dummy included,
    with their patch grids where the family's vary (``layout``)."""
    images, grids = layout.tower_inputs(batch), layout.grids(batch)
    head = valid_tokens(batch["labels"])  # the LM head runs on the trained positions only (loss_positions)
    return [BatchShape(rows, seq, images=images if j == 0 else 0, grids=grids if j == 0 else (),
                       head_tokens=head if j == 0 else 0) for j, (rows, seq) in enumerate(batch["rows"])]


def part_groups(model, rates: dict[str, float]) -> list[tuple[str, list, float]]:
    """Parts with their own peak LR (--lr-groups, --projector-lr) as (part, parameters, peak LR) for
    engine.initialize: ``region`` the decoder layers' (the trainable ones: the region's layers, sub-layers or
    adapters), the rest the part's own; a tied embedding / LM head tensor takes embed's rate, else lm_head's."""
    owners = families.find_parts(model).owners()
    want = {"layers" if part == "region" else part: lr for part, lr in rates.items()}
    if families.TIED in owners.values():
        tied = want.get("embed", want.get("lm_head"))
        if tied is not None:
            want[families.TIED] = tied
    groups: dict[str, list] = {part: [] for part in want}
    for p in model.parameters():
        part = owners.get(id(p))
        if part in groups and p.requires_grad:
            groups[part].append(p)
    return [("region" if part == "layers" else part, params, want[part]) for part, params in groups.items() if params]


def run_identity(cfg: RunConfig, s: Setup, total_steps: int, dataset_size: int) -> dict:
    """What a resumed run must share with its checkpoint: every RunConfig field but those in
    config.RESUME_MAY_CHANGE (paths as absolute paths, the model and starting projector by fingerprint, the region as
    its resolved layers and parts, the ZeRO stage and precision as resolved), plus what the run derives from them
    (ranks, data set size, step count). checkpoint.IDENTITY_WHY says why the named ones matter."""
    ident = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RESUME_MAY_CHANGE}
    for name in ("llm", "vision", "image_folder", "data", "init_projector"):
        ident[name] = ident[name] and os.path.abspath(ident[name])
    ident.update({
        "model": checkpoint.fingerprint_dir(cfg.model_path), "init": init_fingerprint(cfg),
        "ds_config": checkpoint.fingerprint_file(cfg.ds_config),
        "region": {"layers": list(s.region.layers), "parts": dict(s.region.parts),
                   **({"sublayer": s.region.sublayer} if s.region.sublayer else {})},  # whole layers: as before
        "world_size": engine.world_size(), "dataset_size": dataset_size,
        "sampling": {"group_by_length": cfg.group_by_length, "packing": cfg.packing},
        "total_steps": total_steps,
        "tuner": {"kind": cfg.tuner, **({"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout}
                                        if cfg.tuner == "lora" else {})},
        "zero_stage": engine.zero_stage(s.ds_config), "precision": s.precision,
        "offload": engine.optimizer_offload(s.ds_config)})
    for name in ("group_by_length", "packing", "lora_r", "lora_alpha", "lora_dropout", "zero"):
        del ident[name]  # in sampling, tuner and zero_stage above
    return ident


def init_fingerprint(cfg: RunConfig) -> str | None:
    """Identity of the starting projector: --init's projector file or --init-projector's file."""
    if cfg.init_projector:
        return checkpoint.fingerprint_file(cfg.init_projector)
    return checkpoint.fingerprint_dir(cfg.init, (PROJECTOR_FILE,))


def open_metrics(path: str, start_step: int):
    """metrics.jsonl for appending; on resume, lines after the checkpoint's step (written by the interrupted
    session, about to be redone) are dropped so the file reads as one uninterrupted run. The kept lines are written
    aside and renamed in (a crash keeps the old file); a torn last line is dropped with a warning."""
    if start_step == 0:
        return open(path, "w")
    kept = []
    if os.path.isfile(path):
        kept = [r for r in outputs.read_jsonl(path) if r.get("step", 0) <= start_step and "eval" not in r]
    outputs.write_jsonl_atomic(path, kept)
    return open(path, "a")


def train_and_compare(cfg: RunConfig) -> "Result":
    """train(), then with --compare-full the full-tuning arm of the same job, timed in the same allocation.

    The full arm runs after the selective one is saved (a failure there loses nothing), into
    OUTPUT_DIR/compare-full, with every setting but the region and the step count unchanged; it exports no
    model and skips evaluation. Both arms' steady-state step times and the GPU-hours of one epoch projected
    from them go into run.json under "compare_full". Given a finished full run's directory instead, its
    measured totals are used.
    """
    result = train(cfg)
    if cfg.compare_full is None or result.summary["status"] != "complete" or result.nothing_to_do:
        return result
    mine = result.summary
    if cfg.compare_full.isdigit():
        engine.release(result.engine)
        prepared = os.path.join(cfg.output_dir, "prepared", "train")  # the same samples, not prepared again
        arm = dataclasses.replace(cfg, region="full", region_schedule=None, max_steps=int(cfg.compare_full),
                                  compare_full=None,
                                  data=prepared if prepare.is_prepared(prepared) else cfg.data,
                                  output_dir=os.path.join(cfg.output_dir, "compare-full"), save_every=0, resume=None,
                                  overwrite=True,  # the arm's directory is this run's own
                                  eval_data=None, export_model=False,
                                  plan="off", gpu_memory_gb=None, global_batch=None)  # this run's planned values
        try:
            full = train(arm).summary
            source = f"measured here: {arm.max_steps} steps of region full in {arm.output_dir}"
        except torch.OutOfMemoryError as e:
            mine["compare_full"] = {"error": f"full tuning did not fit at these settings: {e}"}
            full = None
    else:
        full = json.loads(open(os.path.join(cfg.compare_full, "run.json")).read())
        source = f"the finished full run {cfg.compare_full}"
    if full is not None:
        mine["compare_full"] = compare_arms(mine, full, source)
    if engine.rank() == 0:
        outputs.write_json_atomic(os.path.join(cfg.output_dir, "run.json"), mine)
        c = mine["compare_full"]
        if "error" in c:
            log.warning("compare-full: %s", c["error"])
        else:
            log.info("compare-full: step %.4f s (this run) vs %.4f s (full): ratio %.3f, FLOP model %.3f; one epoch "
                     "%.4g vs %.4g GPU-hours", c["step_seconds"]["selective"], c["step_seconds"]["full"],
                     c["step_time_ratio"], c["ideal_ratio"], c["epoch_gpu_hours"]["selective"],
                     c["epoch_gpu_hours"]["full"])
    return result


def compare_arms(mine: dict, full: dict, source: str) -> dict:
    """Steady-state step times of both arms and one epoch's GPU-hours projected from them."""
    a, b = mine["timing"], full["timing"]
    spe, world = mine["steps_per_epoch"], mine["world_size"]
    return {"source": source, "full_steps": full.get("steps_done"),
            "step_seconds": {"selective": a["step_seconds"], "full": b["step_seconds"]},
            "step_time_ratio": a["step_seconds"] / b["step_seconds"],
            "ideal_ratio": a["hardware_tflops_per_step"] / b["hardware_tflops_per_step"],
            "peak_memory_gb": {"selective": a["peak_memory_gb_rank0"], "full": b["peak_memory_gb_rank0"]},
            "steps_per_epoch": spe,
            "epoch_gpu_hours": {"selective": a["step_seconds"] * spe * world / 3600,
                                "full": b["step_seconds"] * spe * full["world_size"] / 3600},
            "projection": "one epoch = steps_per_epoch x steady-state step time x ranks"}


@dataclass
class Result:
    summary: dict  # what run.json holds
    engine: object  # the DeepSpeed engine after training (for callers that inspect the weights); None: not trained
    nothing_to_do: bool = False  # --resume auto found the run already complete (summary: its run.json)


def export_model(ds_engine, processor, out: str, adapters=None) -> None:
    """Write the model in transformers format (safetensors) with its processor; gathers ZeRO-3 shards.

    With LoRA (``adapters``: its peft config) the model written is the merged one, and ``out/adapter`` holds
    the adapter in peft's format with the trained projector beside it.
    """
    state = engine.full_state_dict(ds_engine)  # every rank takes part in the gather

    def write(d: str) -> None:
        # The projector first: save_pretrained pops every tensor it writes from the dict it is given (transformers
        # 5.24, seen on tied models), so it gets a shallow copy and nothing reads ``state`` after it.
        export_projector(ds_engine.module, state, d)
        if adapters is None:
            # Saved through a fresh meta-device instance of the class: save_pretrained renames tensors by the model's
            # load history, and a model loaded under ZeRO-3 carries transformers' legacy renamings too, which gave
            # names no published checkpoint has (language_model.model.model.*). A fresh instance writes the names
            # save_pretrained writes for this class, whatever the ZeRO stage.
            fresh = skeleton(ds_engine.module.config)
            fresh.generation_config = ds_engine.module.generation_config
            fresh.save_pretrained(d, state_dict=dict(state), safe_serialization=True)
        else:
            lora.export(ds_engine.module, adapters, state, d)
            export_projector(ds_engine.module, state, os.path.join(d, lora.ADAPTER_DIR))
        processor.save_pretrained(d)

    if engine.rank() == 0:
        checkpoint.export(out, write)  # written aside, then moved in: a crash mid-write keeps the previous export
        log.info("saved model and processor to %s", out)
    engine.barrier()


def _float(x) -> float:
    return float(x) if x is not None else float("nan")
