"""Stage 2 (visual instruction tuning): train the projector and a region of LLM layers.

    deepspeed launch/sft.py --region uniform25 --init runs/pretrain --output-dir runs/sft-u25   # demo, CPU
    deepspeed --num_gpus 2 launch/sft.py --region layers:1,5,9,13 --zero 3 --output-dir runs/sft-l4
    deepspeed --num_gpus 8 launch/sft.py --model CKPT --data llava_v1_5_mix665k.json --image-folder IMG \\
        --region uniform25 --init runs/pretrain --zero 3 --micro-batch 16 --grad-accum 1 --grad-ckpt \\
        --output-dir runs/sft-u25
    lvlm-region sft --config recipes/llava-1.5-7b-sft-uniform25.yaml --dry-run 8     # the recipe, resolved
    deepspeed --num_gpus 8 --module lvlm_region sft --config runs/sft-u25/run.json --output-dir runs/again

Flags: lvlm-region sft --help (the same as python launch/sft.py --help).
"""
from ..train import cli


def parser():
    return cli.build_parser("sft", __doc__)


def main(argv: list[str] | None = None) -> int:
    return cli.main("sft", __doc__, argv)
