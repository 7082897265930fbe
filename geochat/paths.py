"""Where geochat keeps what it derives once and reuses: converted weights, indexes.

Everything lives under one cache root, `$GEOCHAT_CACHE` when set, else `~/.cache/geochat`. Writes
go to a temporary sibling that is renamed into place, so a process killed mid-conversion never
leaves a half-written directory that a later load would trust.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "GEOCHAT_CACHE"


def cache_root() -> Path:
    """The cache root directory (created on first use)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "geochat").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def utf8_name(path: str | Path) -> bool:
    """Whether a file name is valid UTF-8, as GDAL and chromadb need (a name from another encoding reaches Python
    with lone surrogates in it)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
