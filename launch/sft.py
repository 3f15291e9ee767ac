"""Stage 2 (visual instruction tuning): train the projector and a region of LLM layers.

    deepspeed launch/sft.py --region uniform25 --init runs/pretrain --output-dir runs/sft-u25   # demo, CPU
    deepspeed --num_gpus 2 launch/sft.py --region layers:1,5,9,13 --zero 3 --output-dir runs/sft-l4
    deepspeed --num_gpus 8 launch/sft.py --model CKPT --data llava_v1_5_mix665k.json --image-folder IMG \\
        --region uniform25 --init runs/pretrain --zero 3 --micro-batch 16 --grad-accum 1 --grad-ckpt \\
        --output-dir runs/sft-u25

Flags: python launch/sft.py --help.
"""

from lvlm_region.cli import main

if __name__ == "__main__":
    code = main("sft", __doc__)
    from lvlm_region.engine import exit_process  # after main: a rank leaves the process group cleanly

    exit_process(code)
