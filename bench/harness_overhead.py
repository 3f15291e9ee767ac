"""Cost of the timing harness per training step, against the step time of a real run, in one process.

    python bench/harness_overhead.py [--steps 30 --micro-batch 16 --grad-accum 1]

1. Runs the demo stage-2 job (real trainer and DeepSpeed engine, one CPU rank) for --steps steps and takes
   its steady-state step time from run.json.
2. Runs exactly what the harness adds to each step of that job -- the phase timer (start, one data phase,
   forward / backward / optimizer phases per micro-batch, finish), the FLOP model over the step's batch
   shapes, the two Totals updates and the extra numbers in the step's all-reduce -- many times, and times it.
Prints the harness's cost per step, the step time, and their ratio (target: under 1%).

Why not two whole runs with the harness on and off: on a shared 2-core machine two identical runs differ by
several percent from noise alone, far more than the effect measured here; timing the added work directly
resolves it.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

from lvlm_region.train import engine
from lvlm_region.infra import timing
from lvlm_region.config import RunConfig
from lvlm_region.data.batches import BatchStream, ImageTextDataset
from lvlm_region.data.batches import run_loader
from lvlm_region.model.families import flop_model as build_flop_model
from lvlm_region.train.run_setup import obtain_data, setup
from lvlm_region.train.trainer import batch_shapes, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2000, help="harness iterations timed")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(stage="sft", output_dir=out, max_steps=args.steps, micro_batch=args.micro_batch,
                        grad_accum=args.grad_accum, num_workers=1, log_every=10 ** 6, eval_max_samples=1)
        result = train(cfg)
        step_s = result.summary["timing"]["step_seconds"]
        flop_model = build_flop_model(result.engine.module)

        # the batches of this job, as the harness sees them
        s = setup(RunConfig(stage="sft", output_dir=out, micro_batch=args.micro_batch, num_workers=0))
        ds, folder = obtain_data(s.cfg.data, s.cfg.image_folder, "train", s)
        items = ImageTextDataset(ds, folder, s.load_image, s.encoding.layout)
        stream = BatchStream(run_loader(items, s.cfg, s.tokenizer.pad_token_id, s.encoding.layout.dummy(), 0, 1,
                                        shuffle=True, drop_last=True))
        micro = [next(stream) for _ in range(args.grad_accum)]

    timer, totals, window = timing.StepTimer(), timing.Totals(warmup=5), timing.Totals(warmup=0)
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        timer.start()
        with timer.phase("data"):
            pass
        for _ in micro:
            for phase in ("forward", "backward", "optimizer"):
                with timer.phase(phase):
                    pass
        work = flop_model.step([shape for b in micro for shape in batch_shapes(b, s.encoding.layout)])
        extra = [sum(b["n_tokens"] for b in micro), sum(b["n_samples"] for b in micro),
                 sum(b["real_images"] for b in micro), work.model, work.hardware]
        times = timer.finish()
        totals.add(times, *extra)
        window.add(times, *extra)
    harness_s = (time.perf_counter() - t0) / args.repeats
    engine.barrier()
    print(json.dumps({"step_seconds": step_s, "harness_seconds_per_step": harness_s,
                      "overhead": harness_s / step_s}, indent=1))
    print(f"harness {harness_s * 1e6:.0f} us per step vs step {step_s * 1e3:.1f} ms: overhead "
          f"{100 * harness_s / step_s:.3f}% ({'under' if harness_s / step_s < 0.01 else 'OVER'} the 1% target)")


if __name__ == "__main__":
    main()
