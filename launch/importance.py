"""lvlm-region importance as a script (lvlm_region/commands/importance.py): `python launch/importance.py ...`."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main(["importance", *sys.argv[1:]]))
