"""Evaluate a model directory on held-out data: token loss, answer accuracy (overall and per `category` when the
samples carry one), text retention (--text-eval-data: text-only questions), right and wrong examples.

    python launch/evaluate.py --model runs/sft-u25 --data data/demo/sft_eval.json            # one process
    lvlm-region evaluate --model runs/sft-u25 --data data/demo/sft_eval.json          # the same
    deepspeed --num_gpus 2 launch/evaluate.py --model runs/sft-u25 --data EVAL --zero 3 --output-dir runs/eval-u25

Any model this project writes (stage-1 or stage-2 export, LoRA-merged) or any local Llava / Qwen2-VL checkpoint.
The numbers are those of the end-of-run evaluation (the same code): the normalised exact match of the greedy
answer against the last reply of each sample, and the mean token loss over the replies. Writes
OUTPUT_DIR/eval.json and eval.md (default OUTPUT_DIR: MODEL/eval). A model trained here is evaluated with the
template, image aspect handling and --max-length of its run.json unless given. --zero 3 partitions the weights
over the ranks (for models one GPU cannot hold); otherwise every rank holds the model and evaluates its shard.
Exit status: 0 done, 2 bad input.
"""
import os
import sys

from ..infra import hub
from ..train import cli

FLAGS = ("model", "data", "text_eval_data", "image_folder", "output_dir", "template", "image_aspect_ratio",
         "max_length", "micro_batch", "zero", "eval_max_samples", "max_new_tokens", "precision", "attn", "num_workers",
         "seed", "verify_images", "on_bad_sample", "max_bad_fraction", "allow_outside_images", "prep_workers",
         "prep_timeout", "dist_timeout")
FROM_RUN = "the model's run.json when it has one, else as stage 2 does"
UNSET = {"output_dir": "MODEL/eval", "template": FROM_RUN, "image_aspect_ratio": FROM_RUN, "max_length": FROM_RUN}


def parser():
    p = cli.command_parser(__doc__, ranks=True)
    cli.add_flags(p, "sft", FLAGS, unset=UNSET)
    return p


def main(argv=None) -> int:
    args = cli.command_values(parser(), argv)
    cli.log_to_stdout()
    from ..tools.evaluate import evaluate_model, evaluation_config

    if not args["model"] or not args["data"]:
        print("error: --model and --data are required: the model directory and the held-out data", file=sys.stderr)
        return 2
    try:
        if hub.is_hub_id(args["model"]) and not args["output_dir"]:
            raise ValueError(f"--model {args['model']} is a hub id: give --output-dir (the default MODEL/eval would "
                             "write into the Hugging Face cache)")
        args["model"] = hub.local_path(args["model"])
        cfg = evaluation_config(**args)
        out = evaluate_model(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"held-out answer accuracy {out['accuracy']:.3f} ({out['correct']}/{out['samples']}), loss "
              f"{out['loss']:.4f}: {os.path.join(cfg.output_dir, 'eval.json')}")
    return 0
