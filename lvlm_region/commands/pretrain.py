"""Stage 1: train only the projector (region `none`), on image-caption pairs with the plain template.

    deepspeed launch/pretrain.py --output-dir runs/pretrain                      # embedded tiny demo, CPU
    deepspeed --num_gpus 8 launch/pretrain.py --model CKPT --data blip_558k.json --image-folder IMG \\
        --output-dir runs/pretrain --micro-batch 32 --grad-accum 1 --lr 1e-3
    lvlm-region pretrain --config recipes/llava-1.5-7b-pretrain.yaml --dry-run 8        # the recipe, resolved

Flags: lvlm-region pretrain --help (the same as python launch/pretrain.py --help).
"""
from ..train import cli


def parser():
    return cli.build_parser("pretrain", __doc__)


def main(argv: list[str] | None = None) -> int:
    return cli.main("pretrain", __doc__, argv)
