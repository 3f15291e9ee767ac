"""python -m lvlm_region <command> [flags]: the same as the lvlm-region console script."""
import sys

from lvlm_region.commands import main

if __name__ == "__main__":
    sys.exit(main())
