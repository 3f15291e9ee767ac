"""lvlm-region prune, as a script: `python launch/prune.py ...`; its flags: --help (lvlm_region/commands/prune.py)."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
