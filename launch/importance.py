"""Score every decoder layer of a model's LLM: block influence (bi) or relative weight change against a base (delta).

    python launch/importance.py --model runs/sft-u25 --data data/demo/pretrain.json --samples 1000   # one process
    deepspeed --num_gpus 8 launch/importance.py --model CKPT --data captions.json --image-folder IMG --zero 3 \\
        --output runs/scores.json
    python launch/importance.py --model runs/sft-full --method delta --base data/demo/base_model

bi: BI_i = 1 - mean over tokens of cos(h_in_i, h_out_i) (hidden states entering and leaving layer i; --tokens
all | text | image), over --samples samples of --data drawn with --seed (the paper: 1,000 image descriptions).
delta: ||W_i - W_base_i|| / ||W_base_i|| per layer (no data). Writes OUTPUT (default MODEL/importance/scores.json:
method, per-layer scores in layer order, samples and tokens used, the model and its trained region) and a bar
chart beside it (.png). A region spec can then pick layers by score: --region top25@OUTPUT.
Exit status: 0 done, 2 bad input.
"""
import argparse
import logging
import os
import sys

from lvlm_region.cli import add_flags

FLAGS = ("model", "data", "image_folder", "template", "image_aspect_ratio", "max_length", "micro_batch", "zero",
         "precision", "attn", "num_workers", "seed", "verify_images", "on_bad_sample", "max_bad_fraction",
         "allow_outside_images", "prep_workers", "prep_timeout", "dist_timeout")
FROM_RUN = "the model's run.json when it has one, else as stage 2 does"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_flags(p, "sft", FLAGS, unset={"template": FROM_RUN, "image_aspect_ratio": FROM_RUN, "max_length": FROM_RUN})
    p.add_argument("--method", default="bi", help="bi (block influence, default) | delta (weight change, --base)")
    p.add_argument("--samples", type=int, default=1000, help="samples of --data scored (default 1000; 0: all)")
    p.add_argument("--tokens", default="all", help="positions scored: all (default) | text | image")
    p.add_argument("--base", help="--method delta: the model the scored one was tuned from")
    p.add_argument("--output", help="scores file (default MODEL/importance/scores.json); the chart beside it (.png)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    args = vars(p.parse_args(argv))
    args.pop("local_rank")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    from lvlm_region.eval_run import evaluation_config  # after logging is set up; heavy imports
    from lvlm_region.importance import score

    method, samples, tokens, base, output = (args.pop(k) for k in ("method", "samples", "tokens", "base", "output"))
    if not args["model"]:
        print("error: --model is required: the model directory whose layers are scored", file=sys.stderr)
        return 2
    if method == "bi" and not args["data"]:
        print("error: --method bi needs --data: the samples whose hidden states are read", file=sys.stderr)
        return 2
    if samples < 0:
        print(f"error: --samples must be >= 0 (0: all), got {samples}", file=sys.stderr)
        return 2
    output = output or os.path.join(args["model"], "importance", "scores.json")
    try:
        cfg = evaluation_config(output_dir=os.path.dirname(os.path.abspath(output)), **args)
        out = score(cfg, method, output, samples=samples or None, tokens=tokens, base=base)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"{method} scores of {out['layers']} layers: " + " ".join(f"{x:.4f}" for x in out["scores"])
              + f" -> {output}")
    return 0


if __name__ == "__main__":
    code = main()
    from lvlm_region.engine import exit_process  # after main: a rank leaves the process group cleanly

    exit_process(code)
