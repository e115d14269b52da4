"""``python -m helpers SUBCOMMAND ...``: the same command line as ``crowd`` (helpers.tools.cli)."""

import sys

from helpers.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m helpers"))
