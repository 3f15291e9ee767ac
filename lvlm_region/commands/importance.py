"""Score every decoder layer of a model's LLM: block influence (bi), relative weight change against a base (delta),
or weight signal-to-noise (snr).

    python launch/importance.py --model runs/sft-u25 --data data/demo/pretrain.json --samples 1000   # one process
    deepspeed --num_gpus 8 launch/importance.py --model CKPT --data captions.json --image-folder IMG --zero 3 \\
        --output runs/scores.json
    python launch/importance.py --model runs/sft-full --method delta --base data/demo/base_model
    python launch/importance.py --model data/demo/base_model --method snr --output runs/snr.json

bi: BI_i = 1 - mean over tokens of cos(h_in_i, h_out_i) (hidden states entering and leaving layer i; --tokens
all | text | image), over --samples samples of --data drawn with --seed (the paper: 1,000 image descriptions).
delta: ||W_i - W_base_i|| / ||W_base_i|| per layer (no data). snr: Spectrum's signal-to-noise of each weight matrix
(singular values above the Marchenko-Pastur bulk edge over those below, over the largest), the layer's mean (no
data). grad: the norm of the training loss's gradient on each layer's weights over --samples of --data (1..N ranks,
ZeRO-2 or 3). Writes OUTPUT (default MODEL/importance/scores.json:
method, per-layer scores in layer order, samples and tokens used, the model and its trained region) and a bar
chart beside it (.png). A region spec can then pick layers by score: --region top25@OUTPUT.
Exit status: 0 done, 2 bad input.
"""
import os
import sys
from dataclasses import dataclass

from ..config import AT_LEAST_0, setting
from ..infra import hub
from ..train import cli

FLAGS = ("model", "data", "image_folder", "template", "image_aspect_ratio", "max_length", "micro_batch", "zero",
         "precision", "attn", "num_workers", "seed", "verify_images", "on_bad_sample", "max_bad_fraction",
         "allow_outside_images", "prep_workers", "prep_timeout", "dist_timeout")
FROM_RUN = "the model's run.json when it has one, else as stage 2 does"


@dataclass
class Settings:
    """importance's own flags (the rest are RunConfig's, FLAGS)."""

    method: str = setting("bi", "bi (block influence) | delta (weight change against --base) | snr (each layer's "
                                "weight matrices' signal-to-noise from their singular values; no data)")
    samples: int = setting(1000, "samples of --data scored (0: all)", valid=AT_LEAST_0)
    tokens: str = setting("all", "positions scored: all | text | image")
    base: str | None = setting(None, "--method delta: the model the scored one was tuned from")
    output: str | None = setting(None, "scores file; the chart beside it (.png)",
                                 default_help="MODEL/importance/scores.json")


def parser():
    p = cli.command_parser(__doc__, ranks=True)
    cli.add_flags(p, "sft", FLAGS, unset={"template": FROM_RUN, "image_aspect_ratio": FROM_RUN, "max_length": FROM_RUN})
    cli.add_flags(p, settings=Settings)
    return p


def main(argv=None) -> int:
    args = cli.command_values(parser(), argv)
    cli.log_to_stdout()
    from ..tools.evaluate import evaluation_config
    from ..tools.importance import score

    method, samples, tokens, base, output = (args.pop(k) for k in ("method", "samples", "tokens", "base", "output"))
    if not args["model"]:
        print("error: --model is required: the model directory whose layers are scored", file=sys.stderr)
        return 2
    if method in ("bi", "grad") and not args["data"]:
        print(f"error: --method {method} needs --data: the samples " + (
            "whose hidden states are read" if method == "bi" else "whose loss is differentiated"), file=sys.stderr)
        return 2
    try:
        if hub.is_hub_id(args["model"]) and not output:
            raise ValueError(f"--model {args['model']} is a hub id: give --output (the default "
                             "MODEL/importance/scores.json would write into the Hugging Face cache)")
        output = output or os.path.join(args["model"], "importance", "scores.json")
        args["model"], base = hub.local_path(args["model"]), hub.local_path(base, "--base")
        cfg = evaluation_config(output_dir=os.path.dirname(os.path.abspath(output)), **args)
        out = score(cfg, method, output, samples=samples or None, tokens=tokens, base=base)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"{method} scores of {out['layers']} layers: " + " ".join(f"{x:.4f}" for x in out["scores"])
              + f" -> {output}")
    return 0
