"""Every shipped recipe and accelerate config under adapters/ loads; bad recipes fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from geochat.errors import GeoChatError
from geochat.train.recipe import load_recipe

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
RECIPES = sorted(ADAPTERS.glob("*.yaml"))
ACCELERATE = sorted((ADAPTERS / "accelerate").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 3 and len(ACCELERATE) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.stages
    for stage in recipe.stages:
        cfg = recipe.assistant_config(stage)
        assert cfg.vision["model_type"] == "geochat_hybrid_vision"
    if recipe.model.quantization:
        assert recipe.assistant_config("instruct").quantization == recipe.model.quantization


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_parses(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] in ("NO", "DEEPSPEED", "FSDP")
    if raw["distributed_type"] == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero_stage"] == 2


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("name: x\noutput: o\nalign: {annotations: a.jsonl, typo_key: 1}\n", "unknown key"),
    ("name: x\noutput: o\nalign: {annotations: a.jsonl}\nextra: 1\n", "unknown key"),
    ("name: x\noutput: o\n", "at least one stage"),
    ("name: x\noutput: o\nalign: {annotations: a.jsonl, optim: {lr: -1}}\n", "lr"),
    ("name: x\noutput: o\nalign: {annotations: a.jsonl, optim: {batch_size: two}}\n", "integer"),
    ("name: x\noutput: o\ninstruct: {conversations: c.json}\n", "lora"),
    ("name: x\noutput: o\nmodel: {quantization: 3bit}\nalign: {annotations: a.jsonl}\n", "quantization"),
    ("name: x\noutput: o\nmodel: {lora: {r: 0}}\ninstruct: {conversations: c.json}\n", "rank"),
    ("name: x\noutput: o\nretrieval: {annotations: a.jsonl, rotations: 3}\n", "rotations"),
    ("name: x\noutput: o\nretrieval: {annotations: a.jsonl, from_align: maybe}\n", "true or false"),
    ("name: x\noutput: o\nalign: {annotations: a.jsonl}\nrun: {save_dtype: int8}\n", "save_dtype"),
])
def test_bad_recipes_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(GeoChatError, match=message):
        load_recipe(_write(tmp_path, text))


def test_numbers_and_relative_paths(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, "name: x\noutput: o\nalign: {annotations: d/a.jsonl, optim: {lr: 1e-3}}\n"))
    assert recipe.align is not None and recipe.align.optim.lr == 1e-3
    assert recipe.path(recipe.align.annotations) == (tmp_path / "d" / "a.jsonl").resolve()


def test_init_names_a_directory_beside_the_recipe_or_the_shipped_default(tmp_path: Path) -> None:
    from geochat.model.weights import TRAINED_DEFAULT_DIR
    from geochat.train.run import init_dir

    shipped = ADAPTERS / "geochat-mini-instruct.yaml"
    assert init_dir(load_recipe(shipped)) == ADAPTERS / "geochat-mini"
    copied = tmp_path / "mine.yaml"  # the shipped recipe copied into a user's project keeps its start
    copied.write_text(shipped.read_text())
    assert init_dir(load_recipe(copied)) == TRAINED_DEFAULT_DIR
    (tmp_path / "geochat-mini").mkdir()  # ... unless a directory of that name is beside it
    assert init_dir(load_recipe(copied)) == tmp_path / "geochat-mini"
    other = _write(tmp_path, "name: x\noutput: o\ninit: my-model\nmodel: {lora: {r: 4}}\ninstruct: {conversations: c.json}\n")
    with pytest.raises(GeoChatError, match="init: my-model is not a directory"):
        init_dir(load_recipe(other))
