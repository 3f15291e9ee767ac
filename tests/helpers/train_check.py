"""Run one stage on several DeepSpeed ranks and record what happened to every weight.

    deepspeed --num_gpus 2 tests/helpers/train_check.py pretrain|sft REPORT.json -- <launcher flags>

Rank 0 writes REPORT.json: per parameter whether it was trainable, whether it changed against the run's
starting weights (the base model, with the --init projector when given), and whether the saved checkpoint
reloaded with plain transformers equals the engine's weights after training.
"""
import json
import logging
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from lvlm_region import engine as E
from lvlm_region.cli import parse
from lvlm_region.model import PROJECTOR_FILE, find_parts
from lvlm_region.trainer import train


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the deepspeed launcher
    stage, report_path, flags = argv[0], argv[1], argv[argv.index("--") + 1:]
    cfg = parse(stage, "", flags)
    result = train(cfg)
    engine = result.engine
    trained = {n: p.requires_grad for n, p in engine.module.named_parameters()}
    final = E.full_state_dict(engine)  # the engine's weights, gathered under ZeRO-3
    if E.rank() != 0:
        return
    start = AutoModelForImageTextToText.from_pretrained(cfg.model_path).state_dict()
    if cfg.init:
        proj = load_file(os.path.join(cfg.init, PROJECTOR_FILE))
        base = AutoModelForImageTextToText.from_pretrained(cfg.model_path)
        prefix = next(n for n, m in base.named_modules() if m is find_parts(base).projector) + "."
        start.update({prefix + k: v for k, v in proj.items()})
    reloaded = AutoModelForImageTextToText.from_pretrained(cfg.output_dir).state_dict()
    report = {"params": {}, "summary": {k: v for k, v in result.summary.items() if k != "ds_config"}}
    for name, trainable in trained.items():
        dtype = final[name].dtype  # the run's precision: bf16 runs compare with the base weights in bf16
        report["params"][name] = {
            "trainable": trainable,
            "changed": not torch.equal(final[name], start[name].to(dtype)),
            "reload_equal": reloaded[name].dtype == dtype and torch.equal(reloaded[name], final[name]),
            "dtype": str(dtype),
        }
    with open(report_path, "w") as f:
        json.dump(report, f, default=str)


if __name__ == "__main__":
    main()
