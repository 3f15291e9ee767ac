"""lvlm-region prepare, as a script: `python data_prep/prepare.py ...` (see lvlm_region/commands/prepare.py)."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
