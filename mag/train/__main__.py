"""``python -m mag.train --recipe R --out DIR`` (also the torchrun entry point)."""

import sys

from mag.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
