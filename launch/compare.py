"""lvlm-region compare as a script (lvlm_region/commands/compare.py): `python launch/compare.py ...`."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
