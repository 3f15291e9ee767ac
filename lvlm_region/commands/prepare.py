"""Prepare a training data set once: validate, render with the template, tokenize (in parallel), report.

    python data_prep/prepare.py --data llava_v1_5_mix665k.json --image-folder /data/images \\
        --model /ckpt/llava-base --output /data/prepared/mix665k [--template auto] [--max-length 2048]
    python data_prep/prepare.py --data blip_laion_cc_sbu_558k.json --image-folder /data/images \\
        --model /ckpt/llava-base --stage pretrain --output /data/prepared/pretrain558k
    python data_prep/prepare.py --data mix.json --image-folder /data/images --model /ckpt/Qwen2-VL-7B-Instruct \\
        --output /data/prepared/mix-qwen
    lvlm-region prepare --data mix.json --model CKPT --output OUT       # the same command

The output is a `datasets` directory (datasets.load_from_disk) with input_ids, labels, image paths, length and
modality, plus report.json (samples kept and dropped, per reason, every dropped sample with its line) and
prepare.json. Pass it to training as --data. Running again with the same inputs returns at once.
Exit status: 0 prepared, 2 bad input or too many bad samples (report.json says which).
"""
import os
import sys
from dataclasses import dataclass

from ..config import STAGES, default, setting
from ..train import cli

FLAGS = ("image_folder", "template", "image_aspect_ratio", "max_length", "on_bad_sample", "max_bad_fraction",
         "verify_images", "allow_outside_images", "prep_workers")
AS_STAGE = "as --stage's training has it"


@dataclass
class Settings:
    """prepare's own flags (the rest are RunConfig's, FLAGS, with training's defaults)."""

    data: str = setting(None, "the data to prepare: LLaVA JSON / JSONL, messages+images JSON(L), Parquet, Arrow or "
                              "a `datasets` directory", required=True)
    model: str = setting(None, "the checkpoint dir to train (its tokenizer, image token, config)", required=True)
    output: str = setting(None, "directory to write: a new or empty one, or an earlier preparation (replaced); "
                                "anything else is refused", required=True)
    stage: str = setting("sft", "the stage the data is for: its --template and --image-aspect-ratio defaults",
                         choices=STAGES)


def parser():
    p = cli.command_parser(__doc__)
    cli.add_flags(p, settings=Settings)
    cli.add_flags(p, "sft", FLAGS, unset={"template": f"{AS_STAGE}: plain for stage 1, auto for stage 2",
                                          "image_aspect_ratio": AS_STAGE})
    return p


def main(argv=None) -> int:
    args = cli.command_values(parser(), argv)
    cli.log_to_stdout()
    from ..data import prepare

    folder = args["image_folder"] or os.path.dirname(os.path.abspath(args["data"]))
    template = args["template"] or default("template", args["stage"])
    try:
        prepare.check_output(args["output"])  # before the model's tokenizer loads
        enc, tokenizer, _ = prepare.for_model(args["model"], template, args["max_length"], args["verify_images"],
                                              args["image_aspect_ratio"], args["allow_outside_images"], args["stage"])
        ds = prepare.prepare(args["data"], folder, enc, tokenizer, args["output"], args["on_bad_sample"],
                             args["max_bad_fraction"], args["prep_workers"])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {len(ds)} samples into {args['output']} (report: {os.path.join(args['output'], prepare.REPORT)})")
    return 0
