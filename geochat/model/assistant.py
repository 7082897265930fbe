"""Assemble, save and load the assistant: vision tower → mlp2x_gelu projector → causal LLM (+ adapters).

The composition is transformers' own `LlavaForConditionalGeneration`: `LlavaConfig` holds the
tower's config and the LLM's config, `AutoModel.from_config` builds both, and LLaVA's projector
(Linear → GELU → Linear) is exactly LLaVA-1.5/GeoChat's `mlp2x_gelu`. Pretrained parts are then
put in place: the LLM (from the converted SmolLM2 directory, a local dir or a hub id, optionally
4/8-bit through bitsandbytes), and the tower's pretrained weights. Building the LLaVA shell on the
meta device first avoids allocating a random LLM that would be thrown away.

An assistant directory holds only what is not already shipped elsewhere:

    geochat_config.json     AssistantConfig (which LLM, tower config, adapters)
    vision/                 tower config + safetensors (the frozen shipped EfficientNet stem excluded)
    projector.safetensors   the projector
    adapter/                LoRA adapter (peft format), when there is one
    moe.safetensors         MoE-LoRA routers and experts, when there are any
    llm/                    the LLM itself, only when `llm == "embedded"`
    retrieval/              the dual encoder's search tower and query bank, when a retrieval stage made them
                            (not part of the chat model: saving a loaded assistant copies them as they are)
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from geochat.errors import ModelLoadError
from geochat.model import hybrid_tower  # noqa: F401  (registers the hybrid tower with AutoConfig/AutoModel)
from geochat.model.config import CONFIG_FILE, AssistantConfig
from geochat.model.moe_lora import apply_moe_lora, moe_state_dict
from geochat.model.weights import SMOLLM2_ALIASES, smollm2_dir

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
VISION_DIR = "vision"
RETRIEVAL_DIR = "retrieval"  # an assistant's search tower (the recipe's retrieval stage), beside vision/
LLM_DIR = "llm"
PROJECTOR_FILE = "projector.safetensors"
MOE_FILE = "moe.safetensors"
EMBEDDED_LLM = "embedded"


@dataclass
class Assistant:
    """A loaded assistant: the LLaVA model, its tokenizer and the facts the engine needs."""

    config: AssistantConfig
    model: LlavaForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_token_id: int
    num_image_tokens: int
    image_size: int
    llm_source: str  # where the LLM weights came from (a dir or hub id), for `save`
    directory: Path | None = None  # the assistant directory it was loaded from, if any

    @property
    def llava(self) -> LlavaForConditionalGeneration:
        """The LLaVA model itself, under any peft wrapper."""
        return _llava(self.model)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's padding id, or its end-of-turn id when it has none (SmolLM2)."""
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    @property
    def vision_tower(self) -> nn.Module:
        return self.llava.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.llava.model.multi_modal_projector

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, N, H): projected image tokens ready to splice into the LLM input."""
        out = self.model.get_image_features(
            pixel_values=pixel_values.to(self.model.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return torch.stack(list(out.pooler_output))

    def save(self, directory: str | Path) -> Path:
        return save_assistant(self, Path(directory))


def resolve_llm_source(llm: str, directory: Path | None = None) -> str:
    """Map an LLM name to something `from_pretrained` takes: a directory or a hub id."""
    if llm.lower() in SMOLLM2_ALIASES:
        return str(smollm2_dir())
    if llm == EMBEDDED_LLM:
        if directory is None:
            raise ModelLoadError("llm 'embedded' only makes sense when loading an assistant directory")
        return str(directory / LLM_DIR)
    return llm


def _bnb_config(quantization: str | None) -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _load_llm(source: str, quantization: str | None) -> tuple[Any, Any]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        llm = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=_bnb_config(quantization), dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the language model from '{source}': {exc}") from exc
    return llm, tokenizer


def _add_image_token(llm: Any, tokenizer: Any, token: str) -> None:
    """Add the image placeholder token; its embedding row is the mean row, so reloads are identical.

    (transformers' `mean_resizing` samples the new row at random, which would make a saved and
    reloaded assistant differ in that token's logit.)
    """
    tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    old = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        embeddings = llm.get_input_embeddings().weight
        embeddings[old:] = embeddings[:old].mean(0, keepdim=True)
        head = llm.get_output_embeddings()
        if head is not None and head.weight is not embeddings:
            head.weight[old:] = head.weight[:old].mean(0, keepdim=True)


def _num_image_tokens(vision_config: Any, strategy: str) -> int:
    if isinstance(vision_config, hybrid_tower.GeoHybridVisionConfig):
        return vision_config.num_patches
    patches = (vision_config.image_size // vision_config.patch_size) ** 2  # ViT-style towers (CLIP, SigLIP)
    # CLIP has a CLS token that "default" drops; SigLIP has none.
    has_cls = vision_config.model_type.startswith("clip")
    return patches + (1 if has_cls and strategy == "full" else 0)


def build_assistant(config: AssistantConfig, directory: Path | None = None) -> Assistant:
    """Assemble the LLaVA model described by `config` (weights from `directory` when loading a saved one)."""
    if config.llava_checkpoint:
        model, tokenizer, llm_source = _load_llava_checkpoint(config)
    else:
        model, tokenizer, llm_source = _compose(config, directory)
    if directory is not None:
        model.model.multi_modal_projector.load_state_dict(load_file(str(directory / PROJECTOR_FILE)))
    if config.moe is not None:
        apply_moe_lora(model, config.moe)
        if directory is not None:
            _load_partial(model, load_file(str(directory / MOE_FILE)), "MoE-LoRA")
    llava_config: Any = model.config
    image_token_id = llava_config.image_token_id
    vision_config = llava_config.vision_config
    num_image_tokens = _num_image_tokens(vision_config, config.vision_feature_select_strategy)
    wrapped = _attach_lora(model, config, directory) if config.lora is not None else model
    wrapped.eval()
    return Assistant(config, wrapped, tokenizer, image_token_id, num_image_tokens, vision_config.image_size, llm_source,
                     directory)


def _compose(config: AssistantConfig, directory: Path | None) -> tuple[LlavaForConditionalGeneration, Any, str]:
    """Build the LLaVA shell on the meta device, then put the pretrained LLM and the tower in place."""
    llm_source = resolve_llm_source(config.llm, directory)
    llm, tokenizer = _load_llm(llm_source, config.quantization)
    llm.requires_grad_(False)  # the base LLM is frozen; adapters add the trainable weights
    if config.image_token not in tokenizer.get_vocab():
        _add_image_token(llm, tokenizer, config.image_token)
    vision_kwargs = {k: v for k, v in config.vision.items() if k != "model_type"}
    vision_config = AutoConfig.for_model(config.vision["model_type"], **vision_kwargs)
    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=llm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(config.image_token),
        image_seq_length=_num_image_tokens(vision_config, config.vision_feature_select_strategy),
        projector_hidden_act="gelu",
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    model: Any
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    # Keeps the LLM's tied embeddings/head and any bitsandbytes layers as they are.
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = _build_tower(vision_config, config, directory)
    model.model.multi_modal_projector = LlavaMultiModalProjector(llava_config)
    model.generation_config = llm.generation_config
    model.config.text_config.use_cache = True
    return model, tokenizer, llm_source


def _load_llava_checkpoint(config: AssistantConfig) -> tuple[LlavaForConditionalGeneration, Any, str]:
    """A whole LLaVA checkpoint in transformers' format (e.g. `llava-hf/llava-1.5-7b-hf`)."""
    source = config.llava_checkpoint
    assert source is not None
    try:
        model: Any = LlavaForConditionalGeneration.from_pretrained(
            source, quantization_config=_bnb_config(config.quantization), dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the LLaVA checkpoint '{source}': {exc}") from exc
    model.requires_grad_(False)
    return model, tokenizer, source


def llava_checkpoint_config(source: str) -> AssistantConfig:
    """An AssistantConfig that wraps a transformers LLaVA checkpoint (a directory or a hub id)."""
    from transformers import AutoImageProcessor

    try:
        llava: Any = LlavaConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load '{source}' as a LLaVA checkpoint: {exc}") from exc
    vision = llava.vision_config.to_dict()
    return AssistantConfig(
        name=source,
        llm=source,
        llava_checkpoint=source,
        vision={"model_type": llava.vision_config.model_type, **{k: v for k, v in vision.items() if k != "model_type"}},
        vision_feature_layer=llava.vision_feature_layer,
        vision_feature_select_strategy=llava.vision_feature_select_strategy,
        image_mean=tuple(processor.image_mean),
        image_std=tuple(processor.image_std),
        image_token=str(tokenizer.convert_ids_to_tokens(llava.image_token_id)),
        projector_trained=True,
        description="transformers LLaVA checkpoint",
    )


def _build_tower(vision_config: Any, config: AssistantConfig, directory: Path | None) -> nn.Module:
    if directory is not None and (directory / VISION_DIR / "model.safetensors").is_file():
        tower = AutoModel.from_config(vision_config)
        if isinstance(tower, hybrid_tower.GeoHybridVisionModel):
            tower.load_stem_weights()
        _load_partial(tower, load_file(str(directory / VISION_DIR / "model.safetensors")), "vision tower")
        return tower
    if config.vision_pretrained:
        return AutoModel.from_pretrained(config.vision_pretrained, config=vision_config)
    tower = AutoModel.from_config(vision_config)
    if isinstance(tower, hybrid_tower.GeoHybridVisionModel):
        tower.load_stem_weights()
    return tower


def _load_partial(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a subset of a module's weights; every saved tensor must find its place."""
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ModelLoadError(f"saved {what} weights do not fit this model: unexpected {result.unexpected_keys[:5]}")


def _lora_target_regex(config: AssistantConfig) -> str:
    assert config.lora is not None
    names = "|".join(config.lora.target_modules)
    return rf".*language_model.*\.({names})$"


def _attach_lora(model: LlavaForConditionalGeneration, config: AssistantConfig, directory: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if directory is not None and (directory / ADAPTER_DIR).is_dir():
        return PeftModel.from_pretrained(model, str(directory / ADAPTER_DIR), is_trainable=False)
    assert config.lora is not None
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=_lora_target_regex(config),
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError: no module of the LLM has those names
        raise ModelLoadError(f"model.lora.target_modules {list(config.lora.target_modules)} names no module of the "
                             f"LLM (its attention and MLP layers are q_proj, k_proj, v_proj, o_proj, gate_proj, "
                             f"up_proj, down_proj in Llama-style models): {exc}") from exc
    for name, param in peft_model.named_parameters():  # peft freezes all but LoRA; MoE experts stay trainable
        if ".router." in name or name.endswith((".expert_A", ".expert_B")):
            param.requires_grad_(True)
    return peft_model


def save_assistant(assistant: Assistant, directory: Path) -> Path:
    """Write the assistant directory (safetensors only); see the module docstring for the layout."""
    directory.mkdir(parents=True, exist_ok=True)
    config = assistant.config
    llava = _llava(assistant.model)
    tower = llava.model.vision_tower
    if isinstance(tower, hybrid_tower.GeoHybridVisionModel):
        tower_state = tower.saved_state_dict()
    else:
        tower_state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    (directory / VISION_DIR).mkdir(exist_ok=True)
    tower.config.save_pretrained(directory / VISION_DIR)
    save_file(tower_state, str(directory / VISION_DIR / "model.safetensors"))
    projector_state = {k: v.detach().contiguous() for k, v in llava.model.multi_modal_projector.state_dict().items()}
    save_file(projector_state, str(directory / PROJECTOR_FILE))
    if config.moe is not None:
        save_file(moe_state_dict(llava), str(directory / MOE_FILE))
    if config.lora is not None:
        assistant.model.save_pretrained(str(directory / ADAPTER_DIR))
    if config.llm == EMBEDDED_LLM and Path(assistant.llm_source).resolve() != (directory / LLM_DIR).resolve():
        raise ModelLoadError("re-saving an embedded LLM elsewhere is not supported; save from its source")
    search = assistant.directory / RETRIEVAL_DIR if assistant.directory is not None else None
    target = directory / RETRIEVAL_DIR
    if search is None or search.resolve() != target.resolve():  # the search side goes with the copy (or none)
        if target.exists():
            shutil.rmtree(target)  # another model's search tower must not stay beside this one
        if search is not None and search.is_dir():
            shutil.copytree(search, target)
    config.save(directory)
    return directory


def embed_llm(llm_source: str, directory: Path) -> None:
    """Copy a (small) LLM into an assistant directory so it is self-contained (`llm = "embedded"`)."""
    llm = AutoModelForCausalLM.from_pretrained(llm_source)
    tokenizer = AutoTokenizer.from_pretrained(llm_source)
    llm.save_pretrained(directory / LLM_DIR)
    tokenizer.save_pretrained(directory / LLM_DIR)


def load_assistant(directory: str | Path) -> Assistant:
    """Load an assistant directory written by `save_assistant`, or a transformers LLaVA checkpoint.

    A LLaVA checkpoint is a local directory whose `config.json` says `"model_type": "llava"`, or a
    hub id (which needs the network; nothing is downloaded by default).
    """
    directory = Path(directory)
    if _is_llava_checkpoint(directory):
        return build_assistant(llava_checkpoint_config(str(directory)))
    if not directory.exists() and "/" in str(directory) and not str(directory).startswith(("/", ".")):
        return build_assistant(llava_checkpoint_config(str(directory)))  # a hub id such as llava-hf/llava-1.5-7b-hf
    if not (directory / CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"'{directory}' is not a geochat assistant directory (no {CONFIG_FILE}); "
            "pass a directory written by GeoChat.save_pretrained or `geochat train`"
        )
    try:
        config = AssistantConfig.load(directory)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"cannot read {directory / CONFIG_FILE}: {exc}") from exc
    return build_assistant(config, directory)


def _is_llava_checkpoint(directory: Path) -> bool:
    config_file = directory / "config.json"
    if (directory / CONFIG_FILE).is_file() or not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("model_type") == "llava"
    except json.JSONDecodeError:
        return False


def _llava(model: Any) -> LlavaForConditionalGeneration:
    """The LLaVA model under a peft wrapper, or the model itself."""
    if isinstance(model, LlavaForConditionalGeneration):
        return model
    base = model.get_base_model()
    assert isinstance(base, LlavaForConditionalGeneration)
    return base
