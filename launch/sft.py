"""lvlm-region sft, as a script: `deepspeed launch/sft.py ...`; its flags: --help (lvlm_region/commands/sft.py)."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
