"""lvlm-region report as a script (lvlm_region/commands/report.py): `python launch/report.py ...`."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
