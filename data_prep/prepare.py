"""Prepare a training data set once: validate, render with the template, tokenize (in parallel), report.

    python data_prep/prepare.py --data llava_v1_5_mix665k.json --image-folder /data/images \\
        --model /ckpt/llava-base --output /data/prepared/mix665k [--template auto] [--max-length 2048]
    python data_prep/prepare.py --data blip_laion_cc_sbu_558k.json --image-folder /data/images \\
        --model /ckpt/llava-base --template plain --output /data/prepared/pretrain558k
    python data_prep/prepare.py --data mix.json --image-folder /data/images --model /ckpt/Qwen2-VL-7B-Instruct \\
        --output /data/prepared/mix-qwen

The output is a `datasets` directory (datasets.load_from_disk) with input_ids, labels, image paths, length and
modality, plus report.json (samples kept and dropped, per reason, every dropped sample with its line) and
prepare.json. Pass it to training as --data. Running again with the same inputs returns at once.
Exit status: 0 prepared, 2 bad input or too many bad samples (report.json says which).
"""
import argparse
import logging
import os
import sys

from lvlm_region import prepare
from lvlm_region.cli import field_help, number


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", required=True, help="LLaVA JSON / JSONL, messages+images JSON(L), Parquet, Arrow or a "
                                                 "`datasets` directory")
    p.add_argument("--image-folder", help="root of the image paths (default: the data file's directory)")
    p.add_argument("--model", required=True, help="the checkpoint dir to train (its tokenizer, image token, config)")
    p.add_argument("--output", required=True,
                   help="directory to write: a new or empty one, or an earlier preparation (replaced); anything "
                        "else is refused")
    p.add_argument("--template", default="auto", help="auto (the tokenizer's own, default) | plain | vicuna_v1 | "
                                                      "llama3 | phi3 | chatml")
    p.add_argument("--max-length", type=number("max_length"), default=2048,
                   help="longer samples are dropped and counted")
    p.add_argument("--on-bad-sample", default="skip", help="skip (default) | error")
    p.add_argument("--max-bad-fraction", type=number("max_bad_fraction"), default=0.05)
    p.add_argument("--verify-images", default="decode", help="decode (default) | header")
    p.add_argument("--image-aspect-ratio",
                   help="pad | square (default: as sft: square for Qwen2-VL / Qwen2.5-VL, pad otherwise); decides the "
                        "image token count of Qwen2-VL models, so use the value training will use")
    p.add_argument("--workers", type=number("prep_workers"), help="processes (default: the CPU count)")
    p.add_argument("--allow-outside-images", action="store_true", help=field_help("allow_outside_images"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    folder = args.image_folder or os.path.dirname(os.path.abspath(args.data))
    try:
        prepare.check_output(args.output)  # before the model's tokenizer loads
        enc, tokenizer, _ = prepare.for_model(args.model, args.template, args.max_length, args.verify_images,
                                        args.image_aspect_ratio, args.allow_outside_images)
        ds = prepare.prepare(args.data, folder, enc, tokenizer, args.output, args.on_bad_sample, args.max_bad_fraction,
                       args.workers)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {len(ds)} samples into {args.output} (report: {os.path.join(args.output, prepare.REPORT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
