"""How every benchmark script prints its figures: one JSON object with --json, else one aligned line each."""

from __future__ import annotations

import json
from typing import Any


def print_results(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
        return
    width = max(map(len, results), default=0)
    for key, value in results.items():
        print(f"{key:>{width}}: {value}")
