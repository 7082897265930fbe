"""geochat: a conversational assistant for remote-sensing imagery.

    from geochat import GeoChat
    gc = GeoChat.from_pretrained()            # the offline default model
    answer = gc.chat("scene.tif", "where is the airport?", task="refer")
    answer.geojson                            # boxes in EPSG:4326

Names are imported lazily so that `geochat.imagery`, `geochat.grounding` and `geochat.prompting`
stay light (no torch) for tools that only need them.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns on every CPU with AVX512-BF16 that an optional 4-bit kernel package is
# missing; geochat needs it for nothing, and to a user of the Python API it reads as a broken install.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

_EXPORTS = {
    "Answer": "geochat.answer",
    "BoxResult": "geochat.answer",
    "ModelInfo": "geochat.answer",
    "Timings": "geochat.answer",
    "Turn": "geochat.answer",
    "AnswerStream": "geochat.generation",
    "GeoChat": "geochat.engine",
    "GeoChatError": "geochat.errors",
    "Task": "geochat.prompting",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'geochat' has no attribute {name!r}")
