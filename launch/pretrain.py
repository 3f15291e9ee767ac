"""lvlm-region pretrain as a script (lvlm_region/commands/pretrain.py): `deepspeed launch/pretrain.py ...`."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
