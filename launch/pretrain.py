"""Stage 1: train only the projector (region `none`), on image-caption pairs with the plain template.

    deepspeed launch/pretrain.py --output-dir runs/pretrain                      # embedded tiny demo, CPU
    deepspeed --num_gpus 8 launch/pretrain.py --model CKPT --data blip_558k.json --image-folder IMG \\
        --output-dir runs/pretrain --micro-batch 32 --grad-accum 1 --lr 1e-3

Flags: python launch/pretrain.py --help.
"""

from lvlm_region.cli import main

if __name__ == "__main__":
    code = main("pretrain", __doc__)
    from lvlm_region.engine import exit_process  # after main: a rank leaves the process group cleanly

    exit_process(code)
