"""Shared fixtures: generated GeoTIFFs (seeded, see tests/data/make_fixtures.py) and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.make_fixtures import make_all
from tests.tiny import make_tiny_llm

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def geotiffs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA} (a user's checkout does not have it)")
    return SHARED_DATA
