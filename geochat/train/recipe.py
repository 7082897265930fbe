"""Training recipes: YAML → typed, validated dataclasses (one per concern), unknown keys rejected.

A recipe names the assistant to build (`model`, an `AssistantConfig` without its name) and up to
four stages, run in this order, each starting from the weights the previous one produced:

    align     contrastive dual encoder: tower's pooled head ↔ frozen MiniLM caption embeddings
    pretrain  image → caption with the LLM frozen: the projector (and optionally the tower) learn
    instruct  LoRA / QLoRA / MoE-LoRA on the LLM (+ the projector) over LLaVA-format conversations
    retrieval optional: the align stage's tower refined for search alone (rotations, trainable stem
              blocks), saved apart as `retrieval/vision/`; the chat stages never read it

Relative paths in a recipe are relative to the recipe file, so a recipe under `adapters/` can
point at `../../shared/data` and still run from any working directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from geochat.errors import GeoChatError
from geochat.model.config import AssistantConfig, LoraSettings
from geochat.model.moe_lora import MoELoraSettings

STAGES = ("align", "pretrain", "instruct", "retrieval")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    warmup_steps: int = 0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("optim.lr must be > 0")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError("optim.batch_size, grad_accum and max_steps must be >= 1")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError("optim.warmup_steps must be in [0, max_steps]")


def check_tower_keys(vision: Any, where: str) -> None:
    """`vision` must be a mapping of the hybrid tower's settings: a misspelt key (`hiden_size`) would be
    kept and ignored by the config class, silently training the default size."""
    from inspect import signature

    from geochat.model.hybrid_tower import GeoHybridVisionConfig

    if not isinstance(vision, dict):
        raise ValueError(f"{where} must be a mapping of the tower's settings, got {type(vision).__name__}")
    known = set(signature(GeoHybridVisionConfig.__init__).parameters) - {"self", "kwargs"} | {"model_type"}
    unknown = sorted(set(vision) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; the tower's settings are {sorted(known)}")


@dataclass(frozen=True)
class AlignConfig:
    """Contrastive stage over an annotations JSONL with captions (RSICD's format)."""

    annotations: str
    split: str = "train"              # the training split, or several joined by + (train+val)
    max_images: int | None = None    # seeded random subset of the split(s)
    val_split: str | None = "val"
    val_max: int = 200
    temperature: float = 0.07         # initial; learnable (CLIP)
    label_weight: float = 0.0         # weight of a supervised term: image ↔ its label's prompts (needs labels)
    rotations: int = 1                # 1, 2 or 4: each step shows an image at one of these quarter turns
    stem_lr_scale: float = 1.0        # learning-rate multiplier of the stem's trainable blocks, if any
    crop_min: float = 0.5             # training from pixels: smallest area of a random crop (1: no crops)
    captions: Literal["one", "all"] = "one"  # an image's captions in a step: one at random, or all of them
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.rotations not in (1, 2, 4):
            raise ValueError("rotations must be 1, 2 or 4")
        if self.stem_lr_scale <= 0:
            raise ValueError("stem_lr_scale must be > 0")
        if not 0 < self.crop_min <= 1:
            raise ValueError("crop_min must be in (0, 1]")
        if self.max_images is not None and self.max_images < 2:
            raise ValueError("align.max_images must be >= 2")
        if self.label_weight < 0:
            raise ValueError("align.label_weight must be >= 0")
        if not 0 < self.temperature < 1:
            raise ValueError("align.temperature must be in (0, 1)")
        if self.captions not in ("one", "all"):
            raise ValueError(f"captions must be 'one' or 'all', got {self.captions!r}")
        if self.val_split and self.val_split in self.split.split("+"):
            raise ValueError(f"val_split {self.val_split!r} is also trained on (split {self.split!r}), so its scores "
                             "would not be held out: set val_split: null, or train on other splits")


@dataclass(frozen=True)
class ChatStageConfig:
    """Pretrain or instruct: next-token loss on the answers of LLaVA-format conversations."""

    conversations: str
    max_samples: int | None = None    # seeded random subset
    val_samples: int = 16             # held out from the file for periodic eval
    max_length: int = 512             # tokens; longer samples are skipped (never cut mid-answer)
    train_tower: bool = False         # also train the tower's blocks and head (never the frozen stem)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        if self.val_samples < 0 or self.max_length < 16:
            raise ValueError("val_samples must be >= 0 and max_length >= 16")


@dataclass(frozen=True)
class RetrievalConfig(AlignConfig):
    """A second contrastive run for the dual encoder alone (text↔image search, zero-shot labels).

    It starts from the align stage's tower (when the recipe has one), changes `vision` (e.g.
    `trainable_stem_blocks`), and is saved apart (`retrieval/vision/`), so the tokens the chat
    stages were trained on stay as they were.
    """

    vision: dict[str, Any] = field(default_factory=dict)
    from_align: bool = True           # start from the align stage's tower (else from ImageNet's stem alone)
    query_bank: bool = False          # also write retrieval/query_bank.safetensors (search-query expansion)
    bank_split: str | None = None     # the bank's images: this one training split (None: all of `split`)
    text_head: bool = False           # also train a residual linear map on the text side (text_head.safetensors)
    text_layers: int = 0              # with text_head: LoRA on MiniLM's top N layers too (the head's own copy)
    text_rank: int = 8                # their LoRA rank

    def __post_init__(self) -> None:
        super().__post_init__()
        check_tower_keys(self.vision, "retrieval.vision")
        if self.text_layers and not self.text_head:
            raise ValueError("text_layers adapts the text head's MiniLM: set text_head: true too")
        if self.text_layers < 0 or self.text_rank < 1:
            raise ValueError(f"text_layers must be >= 0 and text_rank >= 1 (got {self.text_layers}, {self.text_rank})")
        if self.bank_split is not None and self.bank_split not in self.split.split("+"):
            raise ValueError(f"bank_split {self.bank_split!r} is not one of the training splits ({self.split!r})")


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 50
    cache_dir: str | None = None      # feature caches (default: <cache root>/align)
    autocast: Literal["bf16"] | None = None  # bf16 autocast of every stage (2.4x faster on AVX512-BF16 CPUs)
    save_dtype: Literal["float32", "float16"] = "float32"  # of the final assistant's weight files

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bf16"):
            raise ValueError("run.autocast must be bf16 or null")
        if self.save_dtype not in ("float32", "float16"):
            raise ValueError("run.save_dtype must be float32 or float16")
        if min(self.log_every, self.eval_every, self.save_every) < 1:
            raise ValueError("run.log_every, eval_every and save_every must be >= 1")


@dataclass(frozen=True)
class ModelSection:
    """The `AssistantConfig` fields a recipe may set (the name comes from the recipe)."""

    llm: str = "smollm2"
    vision: dict[str, Any] = field(default_factory=lambda: {"model_type": "geochat_hybrid_vision"})
    lora: LoraSettings | None = None
    moe: MoELoraSettings | None = None
    quantization: Literal["4bit", "8bit"] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        check_tower_keys(self.vision, "vision")
        if self.vision.get("model_type") != "geochat_hybrid_vision":
            raise ValueError("recipes train the hybrid tower (vision.model_type: geochat_hybrid_vision)")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError("quantization must be 4bit, 8bit or null")


@dataclass(frozen=True)
class Recipe:
    name: str
    output: str
    model: ModelSection = field(default_factory=ModelSection)
    align: AlignConfig | None = None
    pretrain: ChatStageConfig | None = None
    instruct: ChatStageConfig | None = None
    retrieval: RetrievalConfig | None = None
    run: RunConfig = field(default_factory=RunConfig)
    init: str | None = None           # start from this assistant (or align) directory's tower and projector
    base_dir: str = "."               # the recipe file's directory (set by `load_recipe`)

    def __post_init__(self) -> None:
        if not self.name or not self.output:
            raise ValueError("a recipe needs a name and an output directory")
        if not self.stages:
            raise ValueError("a recipe needs at least one stage: align, pretrain, instruct or retrieval")
        if (self.model.quantization or self.model.moe) and self.instruct is None:
            raise ValueError("quantization and moe apply to the instruct stage; add one")
        if self.instruct is not None and self.model.lora is None and self.model.moe is None:
            raise ValueError("the instruct stage needs model.lora or model.moe (the base LLM stays frozen)")

    @property
    def stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s) is not None]

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def assistant_config(self, stage: str) -> AssistantConfig:
        """The assistant a chat stage trains: LoRA/MoE/quantization only from instruct on."""
        m = self.model
        tuned = stage == "instruct"
        return AssistantConfig(
            name=self.name, llm=m.llm, vision=dict(m.vision), description=m.description,
            lora=m.lora if tuned else None, moe=m.moe if tuned else None,
            quantization=m.quantization if tuned else None,
        )


def _build(cls: Any, data: Any, where: str) -> Any:
    """Recursively turn a YAML mapping into dataclass `cls`, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise GeoChatError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise GeoChatError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _value(hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AttributeError) as exc:
        raise GeoChatError(f"{where}: {exc}") from exc


def _value(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if value is None:
        if origin in (Union, UnionType) and type(None) in get_args(hint):
            return None
        raise GeoChatError(f"{where}: a value is needed here (the key is empty); leave the key out for its default")
    candidates = [a for a in get_args(hint) if a is not type(None)] if origin in (Union, UnionType) else [hint]
    for option in candidates:
        if is_dataclass(option):
            data = dict(value) if isinstance(value, dict) else value
            if isinstance(data, dict) and "target_modules" in data:
                if not isinstance(data["target_modules"], list):
                    raise GeoChatError(f"{where}.target_modules: expected a list of module names")
                data["target_modules"] = tuple(data["target_modules"])
            return _build(option, data, where)
    choices = [c for option in candidates if get_origin(option) is Literal for c in get_args(option)]
    if choices and value not in choices:
        raise GeoChatError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    if float in candidates and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 1e-3 (no dot) as a string
        except ValueError as exc:
            raise GeoChatError(f"{where}: expected a number, got {value!r}") from exc
    if bool in candidates and not isinstance(value, bool):
        raise GeoChatError(f"{where}: expected true or false, got {value!r}")
    if int in candidates and not (isinstance(value, int) and not isinstance(value, bool)):
        raise GeoChatError(f"{where}: expected an integer, got {value!r}")
    if str in candidates and not isinstance(value, str):
        raise GeoChatError(f"{where}: expected text, got {value!r}")
    return value


def load_recipe(path: Path) -> Recipe:
    if not path.is_file():
        raise GeoChatError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise GeoChatError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise GeoChatError(f"{path}: a recipe is a mapping of sections")
    if "base_dir" in data:
        raise GeoChatError(f"{path}: 'base_dir' is set from the file's location, not in the recipe")
    return _build(Recipe, {**data, "base_dir": str(path.resolve().parent)}, path.name)
