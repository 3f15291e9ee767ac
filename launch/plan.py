"""lvlm-region plan, as a script: `python launch/plan.py ...`; its flags: --help (lvlm_region/commands/plan.py)."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
