"""`geochat train RECIPE.yaml`: run a training recipe (align → pretrain → instruct, and retrieval)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="run a training recipe (YAML under adapters/)", description=__doc__)
    parser.add_argument("recipe", type=Path, help="recipe YAML")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output directory")
    parser.add_argument("--output", type=Path, help="output directory (default: the recipe's `output`)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from geochat.train.recipe import load_recipe
    from geochat.train.run import run_recipe

    recipe = load_recipe(args.recipe)
    final = run_recipe(recipe, args.output, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # one line for a run, not one a process (torchrun / accelerate set RANK)
        print(f"trained: {final}", file=sys.stderr)
    return 0
