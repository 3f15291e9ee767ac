"""Prune decoder layers outside the visual region: drop the K lowest-scoring layers of a model's LLM.

    python launch/importance.py --model runs/sft-u25 --data data/demo/pretrain.json        # scores first
    python launch/prune.py --model runs/sft-u25 --drop 2 --output runs/sft-u25-drop2
    python launch/prune.py --model runs/sft-u25 --scores runs/sft-u25/importance/scores.json --drop 1,2,3 \\
        --output runs/prune --eval-data data/demo/sft_eval.json --text-eval-data data/demo/text_eval.json

Never drops a layer of the protected region: by default the region the model was trained with (its run.json;
a model without one needs --protect SPEC, or --protect none to allow any layer). Writes a checkpoint plain
transformers from_pretrained loads (layers renumbered, num_hidden_layers and per-layer config lists cut,
tokenizer / processor / chat template copied) with prune.json (source, scores, dropped layers, kept mapping):
OUTPUT itself for one K, OUTPUT/drop<K> for each of several. With --eval-data, launch/evaluate.py evaluates the
unpruned model and every pruned one, generation tokens/s is measured for each in this process, and
OUTPUT/prune_report.{md,json} compares them. A pruned model trains again with launch/sft.py (a short "healing"
SFT) like any other. Exit status: 0 done, 2 bad input.
"""
import os
import sys
from dataclasses import dataclass

from ..config import AT_LEAST_1, setting
from ..infra import hub
from ..train import cli

EVAL_FLAGS = ("text_eval_data", "image_folder", "micro_batch", "eval_max_samples", "max_new_tokens", "precision",
              "attn", "num_workers", "allow_outside_images")


@dataclass
class Settings:
    """prune's own flags (the evaluation's are RunConfig's, EVAL_FLAGS)."""

    model: str = setting(None, "the model directory to prune (a transformers checkpoint)", required=True)
    scores: str | None = setting(None, "per-layer scores from launch/importance.py",
                                 default_help="MODEL/importance/scores.json")
    drop: str = setting(None, "how many layers to drop: K, or K1,K2,... for one model each", required=True)
    protect: str | None = setting(None, "region spec whose layers are never dropped; 'none' allows any layer",
                                  default_help="the region in the model's run.json")
    output: str = setting(None, "the pruned model's directory (several K: one drop<K>/ each)", required=True)
    eval_data: str | None = setting(None, "held-out data: evaluate the unpruned and every pruned model, time their "
                                          "generation, write OUTPUT/prune_report.{md,json}")
    speed_tokens: int = setting(32, "new tokens per prompt when timing generation", valid=AT_LEAST_1)
    speed_repeats: int = setting(3, "timed generations per model, median taken", valid=AT_LEAST_1)


def parser():
    p = cli.command_parser(__doc__, ranks=True)
    cli.add_flags(p, settings=Settings)
    cli.add_flags(p, "sft", EVAL_FLAGS, unset={"precision": "the model's run.json, else as stage 2 does"})
    return p


def main(argv=None) -> int:
    args = cli.command_values(parser(), argv)
    cli.log_to_stdout()
    from ..tools.prune import parse_drops, run

    try:
        if hub.is_hub_id(args["model"]) and not args["scores"]:
            raise ValueError(f"--model {args['model']} is a hub id: give --scores (the default "
                             "MODEL/importance/scores.json is inside the Hugging Face cache)")
        scores = args["scores"] or os.path.join(args["model"], "importance", "scores.json")
        args["model"] = hub.local_path(args["model"])
        out = run(args["model"], scores, parse_drops(args["drop"]), args["protect"], args["output"],
                  args["eval_data"], {k: args[k] for k in EVAL_FLAGS}, args["speed_tokens"], args["speed_repeats"])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m in out["models"]:
        print(f"drop {m['drop']}: removed layers {m['dropped']}, {m['layers_after']} of {m['layers_before']} kept, "
              f"{m['parameters']:,} parameters -> {m['dir']}")
    if "report" in out:
        for r in out["report"]["rows"]:
            rel = "" if r["relative_accuracy"] is None else f" ({r['relative_accuracy']:.3f} of unpruned)"
            print(f"{r['name']}: accuracy {r['accuracy']:.3f}{rel}, {r['tokens_per_s']:.1f} tokens/s "
                  f"({r['speedup']:.2f}x)")
        print(f"report: {os.path.join(args['output'], 'prune_report.md')}")
    return 0
