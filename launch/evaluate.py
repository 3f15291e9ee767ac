"""lvlm-region evaluate as a script (lvlm_region/commands/evaluate.py): `python launch/evaluate.py ...`."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
