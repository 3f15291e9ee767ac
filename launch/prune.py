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
import argparse
import logging
import os
import sys

from lvlm_region.cli import add_flags

EVAL_FLAGS = ("text_eval_data", "image_folder", "micro_batch", "eval_max_samples", "max_new_tokens", "precision",
              "attn", "num_workers", "allow_outside_images")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", required=True, help="the model directory to prune (a transformers checkpoint)")
    p.add_argument("--scores", help="per-layer scores from launch/importance.py (default MODEL/importance/scores.json)")
    p.add_argument("--drop", required=True, help="how many layers to drop: K, or K1,K2,... for one model each")
    p.add_argument("--protect", help="region spec whose layers are never dropped (default: the region in the "
                                     "model's run.json); 'none' allows any layer")
    p.add_argument("--output", required=True, help="the pruned model's directory (several K: one drop<K>/ each)")
    p.add_argument("--eval-data", help="held-out data: evaluate the unpruned and every pruned model, time their "
                                       "generation, write OUTPUT/prune_report.{md,json}")
    p.add_argument("--speed-tokens", type=int, default=32, help="new tokens per prompt when timing generation "
                                                                "(default 32)")
    p.add_argument("--speed-repeats", type=int, default=3, help="timed generations per model, median taken "
                                                                "(default 3)")
    add_flags(p, "sft", EVAL_FLAGS, unset={"precision": "the model's run.json, else as stage 2 does"})
    args = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    from lvlm_region.prune import parse_drops, run  # after logging is set up; heavy imports

    for name in ("speed_tokens", "speed_repeats"):
        if args[name] < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {args[name]}", file=sys.stderr)
            return 2
    scores = args["scores"] or os.path.join(args["model"], "importance", "scores.json")
    try:
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


if __name__ == "__main__":
    code = main()
    from lvlm_region.engine import exit_process  # after main: leaves the process group of the speed timing cleanly

    exit_process(code)
