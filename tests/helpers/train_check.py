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

from lvlm_region.train import checkpoint, engine
from lvlm_region.train.cli import parse
from lvlm_region.model.projector import PROJECTOR_FILE, projector_prefixes
from lvlm_region.train.trainer import train


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the deepspeed launcher
    stage, report_path, flags = argv[0], argv[1], argv[argv.index("--") + 1:]
    cfg = parse(stage, "", flags)
    result = train(cfg)
    ds_engine = result.engine
    trained = {n: p.requires_grad for n, p in ds_engine.module.named_parameters()}
    final = engine.full_state_dict(ds_engine)  # the engine's weights, gathered under ZeRO-3
    size_estimate = checkpoint.checkpoint_bytes(ds_engine)  # what the first save's free-space check asks for
    if engine.rank() == 0:
        write_report(cfg, result, trained, final, size_estimate, report_path)
    engine.barrier()  # the ranks end together, as the launchers' do


def write_report(cfg, result, trained: dict, final: dict, size_estimate: int, report_path: str) -> None:
    start = AutoModelForImageTextToText.from_pretrained(cfg.model_path).state_dict()
    if cfg.init:
        proj = load_file(os.path.join(cfg.init, PROJECTOR_FILE))
        base = AutoModelForImageTextToText.from_pretrained(cfg.model_path)
        for own, theirs in projector_prefixes(base).items():
            start.update({theirs + k[len(own):]: v for k, v in proj.items() if k.startswith(own)})
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
    report["export_names"] = export_names_against_save_pretrained(cfg.output_dir)
    report["checkpoint_bytes_estimate"] = size_estimate
    with open(report_path, "w") as f:
        json.dump(report, f, default=str)


def tensor_names(d: str) -> set[str]:
    from safetensors import safe_open
    names = set()
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors") and f.startswith("model"):
            with safe_open(os.path.join(d, f), "pt") as st:
                names |= set(st.keys())
    return names


def export_names_against_save_pretrained(out: str) -> dict:
    """The tensor names of the export against those transformers' own save_pretrained writes for a fresh model of
    the same class and config (what published checkpoints of the class carry)."""
    import tempfile

    from transformers import AutoConfig
    fresh = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out))
    with tempfile.TemporaryDirectory() as d:
        fresh.save_pretrained(d)
        want = tensor_names(d)
    have = tensor_names(out)
    return {"equal": have == want, "extra": sorted(have - want)[:5], "missing": sorted(want - have)[:5]}


if __name__ == "__main__":
    main()
    engine.exit_process(0)
