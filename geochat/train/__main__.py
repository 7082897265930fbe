"""`python -m geochat.train RECIPE.yaml [--resume] [--output DIR]`, also under `accelerate launch`."""

from __future__ import annotations

import sys

from geochat.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
