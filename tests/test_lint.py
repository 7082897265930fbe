"""Style gates run with the tests: ruff on everything, mypy on the typed core."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TYPED_CORE = ["geochat/model", "geochat/engine.py", "geochat/answer.py", "geochat/cli.py", "geochat/paths.py",
              "geochat/imagery", "geochat/grounding.py", "geochat/box_geometry.py", "geochat/prompting.py",
              "geochat/drawing.py", "geochat/generation.py", "geochat/georeference.py",
              "geochat/tiling.py", "geochat/serving", "app.py"]


def test_ruff() -> None:
    proc = subprocess.run([str(BIN / "ruff"), "check", "--output-format", "concise", "."], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_on_typed_core() -> None:
    proc = subprocess.run([str(BIN / "mypy"), *TYPED_CORE], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
