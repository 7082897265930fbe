"""Write the query bank of a trained search tower (`geochat.train.dual_encoder.QueryBank`).

    python -m geochat.train.query_bank RECIPE.yaml TOWER_DIR

TOWER_DIR holds `vision/` (e.g. `adapters/geochat-mini/retrieval`); the bank is built from the recipe's
retrieval stage data (its training split(s), or `bank_split`, through the same feature caches) and written as
TOWER_DIR/query_bank.safetensors. A retrieval stage with `query_bank: true` does this itself; this
command is for a tower trained without it.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch

from geochat.errors import GeoChatError
from geochat.train.align import AlignModel, build_query_bank, load_align_data
from geochat.train.dual_encoder import TextEncoder, load_text_head, load_tower, save_query_bank, tower_weights
from geochat.train.recipe import RetrievalConfig, load_recipe


def write_query_bank(recipe_path: Path, tower_dir: Path, progress: bool = True) -> Path:
    """Build the bank of the tower saved in `tower_dir` (as its own config describes it) from the recipe's
    training images and captions, and write it beside the tower."""
    recipe = load_recipe(recipe_path)
    cfg = recipe.retrieval or recipe.align
    if cfg is None:
        raise GeoChatError(f"{recipe_path} has neither a retrieval nor an align stage to read data from")
    if not tower_weights(tower_dir).is_file():
        raise GeoChatError(f"{tower_dir} holds no trained tower ({tower_weights(tower_dir)} missing): "
                           "name the directory that holds vision/, e.g. adapters/geochat-mini/retrieval")
    tower = load_tower(tower_dir)  # checks every weight against the saved config
    data = load_align_data(recipe, replace(cfg, val_split=None), tower, TextEncoder(), progress)  # train images only
    model = AlignModel(tower, cfg.temperature, load_text_head(tower_dir)).eval()  # keys in the search space
    align = recipe.assistant_config("align")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = cfg.bank_split if isinstance(cfg, RetrievalConfig) else None
    bank = build_query_bank(model.to(device), data, device, align.image_mean, align.image_std, split)
    return save_query_bank(bank, tower_dir)


def main(argv: list[str] | None = None) -> None:
    """`python -m geochat.train.query_bank RECIPE TOWER_DIR [--quiet]`."""
    parser = argparse.ArgumentParser(prog="python -m geochat.train.query_bank", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("tower_dir", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        print(f"wrote {write_query_bank(args.recipe, args.tower_dir, progress=not args.quiet)}")
    except GeoChatError as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
