"""Run a recipe: its stages in order, each in its own directory, each starting from the last.

    OUTPUT/recipe.json            the recipe as run
    OUTPUT/align/                 log.jsonl, loss.png, checkpoint/, vision/ (the aligned tower), done.json
    OUTPUT/pretrain/assistant/    an assistant directory after pretraining
    OUTPUT/instruct/assistant/    ... after instruction tuning
    OUTPUT/retrieval/             (optional) log.jsonl, loss.png, checkpoint/, vision/ (the search tower), done.json,
                                  query_bank.safetensors (with `query_bank: true`), text_head.safetensors
                                  (with `text_head: true`)
    OUTPUT/assistant/             the final result: the last chat stage's assistant (or the aligned tower),
                                  with the search tower as assistant/retrieval/vision/ when there is one

`resume=True` skips finished stages (`done.json`) and continues an unfinished one from its checkpoint.
Under `accelerate launch` every process trains, only the main one writes files, and all of them wait for
it after each stage, so a stage never reads what the previous one is still writing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from geochat.errors import GeoChatError
from geochat.model.weights import TRAINED_DEFAULT_DIR, store_as_float16
from geochat.train.dual_encoder import QUERY_BANK, RETRIEVAL_DIR, TEXT_HEAD
from geochat.train.recipe import Recipe

FINAL = "assistant"


def _accelerator() -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=not __import__("torch").cuda.is_available())


def init_dir(recipe: Recipe) -> Path | None:
    """The assistant directory `init` names: a path relative to the recipe, or the shipped default's name
    ("geochat-mini", or "default") where no such directory is beside the recipe (a copied recipe keeps working)."""
    if not recipe.init:
        return None
    found = recipe.path(recipe.init)
    if not found.exists() and recipe.init in ("default", TRAINED_DEFAULT_DIR.name):
        found = TRAINED_DEFAULT_DIR
    if not found.is_dir():
        raise GeoChatError(f"init: {recipe.init} is not a directory ({found}): name an assistant directory, relative "
                           f"to the recipe, or '{TRAINED_DEFAULT_DIR.name}' for the shipped default model")
    return found


def run_recipe(recipe: Recipe, output: Path | None = None, resume: bool = False, progress: bool = True,
               stop_after: int | None = None, use_accelerate: bool = True) -> Path:
    """Train every stage of `recipe`; returns the final directory. `stop_after` simulates a kill (tests)."""
    out = output or recipe.path(recipe.output)
    accelerator = _accelerator() if use_accelerate else None
    main = accelerator is None or accelerator.is_main_process

    def everyone_here() -> None:  # no process goes on before the main one has written
        if accelerator is not None:
            accelerator.wait_for_everyone()

    if out.exists() and not out.is_dir():
        raise GeoChatError(f"--output {out} is a file; name a directory")
    if out.exists() and any(p.name != "recipe.json" for p in out.iterdir()) and not resume:  # (a failed start)
        raise GeoChatError(f"{out} is not empty: pass --resume to continue that run, or another --output")
    previous = init_dir(recipe)
    everyone_here()  # every process has checked `out` before the main one writes into it
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(_jsonable(recipe), indent=2))
    retrieval: Path | None = None
    for stage in recipe.stages:
        directory = out / stage
        done = directory / "done.json"
        result = directory if stage in ("align", "retrieval") else directory / FINAL
        if resume and done.is_file():
            if stage == "retrieval":
                retrieval = result
            else:
                previous = result
            continue
        if stage in ("align", "retrieval"):
            from geochat.train.align import run_align

            if stage == "align":
                assert recipe.align is not None
                run_align(recipe, recipe.align, directory, accelerator, resume, progress, stop_after)
            else:
                assert recipe.retrieval is not None
                start = out / "align" if recipe.align is not None and recipe.retrieval.from_align else None
                run_align(recipe, recipe.retrieval, directory, accelerator, resume, progress, stop_after, start)
        else:
            from geochat.train.chat import run_chat_stage

            cfg = recipe.pretrain if stage == "pretrain" else recipe.instruct
            assert cfg is not None
            run_chat_stage(recipe, stage, cfg, directory, previous, accelerator, resume, progress, stop_after)
        everyone_here()
        if main:
            done.write_text(json.dumps({"stage": stage}))
        if stage == "retrieval":
            retrieval = result
        else:
            previous = result
    final = out / FINAL
    if main:
        _assemble(recipe, final, previous, retrieval)
    everyone_here()
    return final


def _assemble(recipe: Recipe, final: Path, previous: Path | None, retrieval: Path | None) -> None:
    """OUTPUT/assistant/: the last chat stage's assistant (or the aligned tower) and the search tower."""
    if previous is not None and previous != final:
        shutil.rmtree(final, ignore_errors=True)
        if previous.name == FINAL:
            shutil.copytree(previous, final)
        else:  # align only: the aligned tower is the product
            shutil.copytree(previous / "vision", final / "vision")
    if retrieval is not None:
        shutil.rmtree(final / RETRIEVAL_DIR, ignore_errors=True)
        shutil.copytree(retrieval / "vision", final / RETRIEVAL_DIR / "vision")
        for name in (QUERY_BANK, TEXT_HEAD):
            if (retrieval / name).is_file():
                shutil.copy2(retrieval / name, final / RETRIEVAL_DIR / name)
    if recipe.run.save_dtype == "float16":
        for path in sorted(final.rglob("*.safetensors")):
            store_as_float16(path)


def _jsonable(recipe: Recipe) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(recipe)
