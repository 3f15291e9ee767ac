"""Run stage 2 with a moving region (--region-schedule) on several DeepSpeed ranks and record, per period, which
weights changed during it.

    deepspeed --num_gpus 2 tests/helpers/schedule_check.py REPORT.json -- <launch/sft.py flags>

The loop is train()'s (Trainer's steps, then finish); after each period's last step every rank gathers the engine's
whole weights (ZeRO-3: from the partitions) and counts the optimizer-state values it holds. Rank 0 writes
REPORT.json: run.json's summary and, per period, the tensors whose values changed during it (against the weights
before its first step), whether the previous period's engine, optimizer and flat weight buffers were freed at the
switch (under bf16 the switch is made before the step, to compare the projector's fp32 masters on its two sides),
the trainable parameter count, every rank's optimizer-state size, the LR of its first step
and each changed tensor's largest change over that LR.
"""
import gc
import json
import logging
import sys
import time
import weakref

import torch

from lvlm_region.model import families
from lvlm_region.model.flops import BatchShape
from lvlm_region.model.load import skeleton
from lvlm_region.model.trainable import apply_region
from lvlm_region.train import engine
from lvlm_region.train.cli import parse
from lvlm_region.train.run_setup import setup
from lvlm_region.train.trainer import Trainer


def weights(ds_engine) -> dict | None:
    """The engine's whole weights on rank 0, copied (on CPU, ZeRO-2's state_dict holds the live tensors)."""
    state = engine.full_state_dict(ds_engine)
    return None if state is None else {k: v.clone() for k, v in state.items()}


def optimizer_state_numel(ds_engine) -> int:
    """The optimizer-state values this rank holds (Adam's two moments over its partition of the trainable
    parameters, ZeRO's padding included): what a moving region keeps at K layers' size."""
    inner = getattr(ds_engine.optimizer, "optimizer", ds_engine.optimizer)
    return sum(t.numel() for state in inner.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


SHAPE = BatchShape(4, 96, images=4, head_tokens=40)


def period_flops(run, period: int) -> float | None:
    """The reference micro-batch's FLOPs on a skeleton with the period's region applied (full tuner: a skeleton has
    no LoRA adapters)."""
    if run.cfg.tuner != "full":
        return None
    shape = skeleton(run.model.config)
    apply_region(shape, run.s.schedule.region(period), run.cfg.tuner)
    return families.flop_model(shape).step([SHAPE]).hardware


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the deepspeed launcher
    report_path, flags = argv[0], argv[argv.index("--") + 1:]
    run = Trainer(setup(parse("sft", "", flags)), time.perf_counter())
    every = run.s.schedule.every
    before = weights(run.engine)
    periods = []
    lr, freed, kept = None, None, None
    for step in range(1, run.total + 1):
        if step > 1 and (step - 1) % every == 0:  # a switch: the engine and its flat weight buffers must go
            opt = run.engine.optimizer
            flat = getattr(opt, "bit16_groups_flat", None) or opt.fp16_partitioned_groups_flat  # ZeRO-2, ZeRO-3
            old = [weakref.ref(run.engine), weakref.ref(opt), *(weakref.ref(t) for t in flat)]
            del opt, flat
            if run.s.precision != "fp32":  # switch here, to read the projector's fp32 masters on both sides
                projector = [p for n, p in run.model.named_parameters() if "multi_modal_projector" in n]
                masters = engine.master_weights(run.engine, projector)
                run.switch(run.s.schedule.period(step), step)
                after = engine.master_weights(run.engine, projector)
                kept = all(torch.equal(a, b) for a, b in zip(masters, after))
        run.step(step)
        if step > 1 and (step - 1) % every == 0:
            gc.collect()
            freed = all(ref() is None for ref in old)
        if lr is None:  # the LR of the period's first step
            lr = run.scheduler.lr_lambdas[0](step - 1) * run.cfg.lr
        if step % every == 0 or step == run.total:
            after = weights(run.engine)
            state = engine.all_gather_object(optimizer_state_numel(run.engine))
            if engine.rank() == 0:
                changed = sorted(n for n in after if not torch.equal(after[n], before[n]))
                periods.append({"period": run.s.schedule.period(step), "last_step": step, "changed": changed,
                                "trainable": run.counts["all"]["trainable"], "optimizer_state": state, "lr": lr,
                                "previous_engine_freed": freed, "projector_masters_kept": kept,
                                # the run's FLOP model of one reference micro-batch, and that of a model skeleton
                                # with the period's region applied: the step's actual trainable set is counted
                                "flops": run.flop_model.step([SHAPE]).hardware,
                                "flops_of_period_region": period_flops(run, run.s.schedule.period(step)),
                                "weight_decay": [g["weight_decay"]
                                                 for g in run.engine.optimizer.optimizer.param_groups],
                                # per tensor, its largest change over the LR of the period's first step
                                "max_moved_over_lr": {n: float((after[n] - before[n]).abs().max()) / lr
                                                      for n in changed}})
            before, lr = after, None
    summary = run.finish(run.total, stopped=False).summary
    if engine.rank() == 0:
        with open(report_path, "w") as f:
            json.dump({"periods": periods, "summary": {k: v for k, v in summary.items() if k != "ds_config"},
                       "names": sorted(before)}, f, default=str)
    engine.barrier()


if __name__ == "__main__":
    main()
