"""Align stage: the hybrid tower's pooled head learns MiniLM's caption space (CLIP loss).

    cached stem features (B, N, C) ─► tower blocks + head ─► normalise ─► image z (B, D)
    (training from pixels, `trainable_stem_blocks` > 4: augmented images ─► the whole tower)
    cached MiniLM caption embeddings, one random caption per image ─► text t (B, D)
    logits = exp(s) · z tᵀ ;  loss = (CE(logits, diag) + CE(logitsᵀ, diag)) / 2
    (`captions: all`: every caption of each image is a text row; the image side is MIL-NCE, the
    log-sum of its own captions' probabilities)
    with `label_weight` w > 0:  loss += w · CE(exp(s) · z Lᵀ, label)   (L: the label-prompt embeddings)

The text side is frozen (it is what retrieval and documentation use), so only the image side moves
into its space; `s` is CLIP's learnable log inverse temperature (clamped at log 100). Both frozen
encoders' outputs are cached on disk (`geochat.train.features`), so an epoch runs only the
tower's blocks and head: seconds per thousand images on a CPU.

The label term is the zero-shot classifier itself (the same prompt ensemble the evaluation uses) as
a supervised objective on the training split's labels; captions stay the main signal, so the space
keeps serving free text and labels never seen in training.

Validation (periodic eval) on a subset of `val_split`: zero-shot accuracy against label prompts and
text→image Recall@1/@10, the numbers the evaluation CLI reports on test.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from geochat.errors import GeoChatError, ModelLoadError
from geochat.eval.metrics import retrieval_recalls
from geochat.model.hybrid_tower import CACHEABLE_TAIL, GeoHybridVisionConfig, GeoHybridVisionModel
from geochat.model.processor import normalise, square_resized, unit_scale
from geochat.paths import cache_root
from geochat.train.dual_encoder import (
    LABEL_PROMPTS,
    QueryBank,
    TextEncoder,
    TextHead,
    label_embeddings,
    label_prompts,
    mean_of_views,
    quarter_turns,
    save_query_bank,
    save_text_head,
    save_tower,
    tower_weights,
)
from geochat.train.features import cache_stem_features, cache_text_embeddings, read_rgb
from geochat.train.loop import Trainer
from geochat.train.recipe import AlignConfig, Recipe, RetrievalConfig

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100.0)


class LogitScale(nn.Module):
    """CLIP's learnt inverse temperature, exp(log), capped. A module of its own holding a 1-d parameter: FSDP shards
    no scalar, and accelerate's FSDP2 loading expects every parameter inside a submodule."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.log = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))

    def forward(self) -> torch.Tensor:
        return self.log.clamp(max=MAX_LOGIT_SCALE).exp()


class AlignModel(nn.Module):
    """The trainable side: tower (stem frozen) + CLIP's learnable temperature (+ the text side's `TextHead`)."""

    def __init__(self, tower: GeoHybridVisionModel, temperature: float, text_head: TextHead | None = None) -> None:
        super().__init__()
        self.tower = tower
        self.logit_scale = LogitScale(temperature)
        self.text_head = text_head

    @property
    def reads_text(self) -> bool:
        """Whether the text side reads texts itself (a head with `text_layers`) rather than MiniLM's vectors."""
        return self.text_head is not None and self.text_head.minilm is not None

    def embed_text(self, text: torch.Tensor | Sequence[str]) -> torch.Tensor:
        """MiniLM's unit vectors (T, D), or the texts themselves where the head reads them (`reads_text`) →
        the search space's vectors (through the text head, if any)."""
        if not isinstance(text, torch.Tensor):
            assert self.text_head is not None
            text = self.text_head.encode(text)
        return self.text_head(text) if self.text_head is not None else text

    def embed_labels(self, label_emb: torch.Tensor | Sequence[str]) -> torch.Tensor:
        """Label vectors (L, D) as `label_embeddings` gives them, or (`reads_text`) each label's
        `LABEL_PROMPTS` in a row, averaged the same way → the search space's vectors."""
        if not isinstance(label_emb, torch.Tensor):
            assert self.text_head is not None
            prompts = self.text_head.encode(label_emb)
            label_emb = F.normalize(prompts.reshape(-1, len(LABEL_PROMPTS), prompts.shape[-1]).mean(1), dim=-1)
        return self.embed_text(label_emb)

    @torch.no_grad()
    def embed_text_array(self, text: np.ndarray | Sequence[str], device: torch.device, labels: bool = False,
                         batch: int = 512) -> np.ndarray:
        """`embed_text` (`embed_labels` with `labels`) of a float array or of texts, computed on `device` in
        batches (validation, the query bank's keys)."""
        embed = self.embed_labels if labels else self.embed_text
        if isinstance(text, np.ndarray):
            return embed(torch.from_numpy(np.asarray(text, dtype=np.float32)).to(device)).float().cpu().numpy()
        step = batch - batch % len(LABEL_PROMPTS) if labels else batch
        parts = [embed(list(text[a : a + step])).float().cpu().numpy() for a in range(0, len(text), step)]
        return np.concatenate(parts) if parts else np.zeros((0, self.tower.config.projection_dim), np.float32)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Unit vectors (B, D) of pixel values (B, 3, S, S) or cached stem features (B, N, C)."""
        out = self.tower(pixel_values=inputs) if inputs.ndim == 4 else self.tower(stem_features=inputs)
        return F.normalize(out.pooler_output, dim=-1)

    def forward(self, inputs: torch.Tensor, text: torch.Tensor | Sequence[str], labels: torch.Tensor | None = None,
                label_emb: torch.Tensor | Sequence[str] | None = None, label_weight: float = 0.0,
                owner: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of a batch (a forward, so that data-parallel wrappers see the call). `text` (T, D) holds
        one caption an image (`owner` None: text i is image i's) or several (`owner[t]`: text t's image);
        where the head reads texts, `text` and `label_emb` are the captions and the label prompts."""
        z = self.embed(inputs)
        text = self.embed_text(text)
        scale = self.logit_scale()
        logits = scale * z @ text.T  # (B, T)
        if owner is None:
            target = torch.arange(len(z), device=z.device)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        else:  # each text picks its image; each image picks any of its texts (MIL-NCE: the sum over them)
            mine = owner[None, :] == torch.arange(len(z), device=z.device)[:, None]  # (B, T)
            image_to_text = (logits.logsumexp(1) - logits.masked_fill(~mine, -torch.inf).logsumexp(1)).mean()
            loss = (image_to_text + F.cross_entropy(logits.T, owner)) / 2
        if label_weight and labels is not None and label_emb is not None:
            loss = loss + label_weight * F.cross_entropy(scale * z @ self.embed_labels(label_emb).T, labels,
                                                         ignore_index=-1)
        return loss


def _rows(path: Path, split: str | None) -> list[dict]:
    if not path.is_file():
        raise GeoChatError(f"annotations file {path} not found: set the stage's `annotations` (a path relative "
                           "to the recipe) to an annotations.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("captions") and (split is None or r.get("split") == split)]


def joined(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays stacked along their first axis; a single one returned as it is (a memory map stays one)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def subset(n: int, k: int | None, seed: int) -> list[int]:
    """A seeded random subset of range(n), in order (the same rule everywhere caches are shared)."""
    return list(range(n)) if k is None or k >= n else sorted(random.Random(seed).sample(range(n), k))


def build_tower(recipe: Recipe, overrides: dict | None = None, start: Path | None = None,
                stem_state: dict[str, torch.Tensor] | None = None) -> GeoHybridVisionModel:
    """The recipe's tower (`model.vision` + `overrides`), from `start`'s trained weights if given
    (`stem_state`: the ImageNet stem's tensors, where its package is not installed)."""
    kwargs = {k: v for k, v in {**recipe.model.vision, **(overrides or {})}.items() if k != "model_type"}
    torch.manual_seed(recipe.run.seed)
    tower = GeoHybridVisionModel(GeoHybridVisionConfig(**kwargs))
    tower.load_stem_weights(stem_state)
    if start is not None:
        result = tower.load_state_dict(load_file(str(tower_weights(start))), strict=False)
        if result.unexpected_keys:
            raise ModelLoadError(f"the tower in {start} does not fit: unexpected {result.unexpected_keys[:5]}")
    return tower


def from_pixels(tower: GeoHybridVisionModel) -> bool:
    """Whether the stage trains on pixels: trainable blocks above 1/32 resolution cannot be cached."""
    return tower.config.trainable_stem_blocks > CACHEABLE_TAIL


@dataclass
class ImageSet:
    """A split's images as a stage sees them: one cached stem-feature array (n, N, C) per quarter turn
    of `turns`, or, training from pixels, `[(n, S, S, 3) uint8]` (turned on the fly)."""

    arrays: list[np.ndarray]
    turns: list[int]

    def __len__(self) -> int:
        return len(self.arrays[0])


@dataclass
class AlignData:
    """Everything a contrastive stage trains and validates on, the frozen encoders' outputs included.

    `text[a:b]` for `(a, b) = spans[i]` are image i's caption embeddings (`captions[a:b]` the captions);
    `label_idx[i]` indexes `label_emb` (-1: no label; `label_prompts`: each label's `LABEL_PROMPTS` in a row);
    `splits[i]` is its split. `val_*` describe the validation images (`val` None: no validation).
    """

    train: ImageSet
    text: np.ndarray
    spans: list[tuple[int, int]]
    label_idx: np.ndarray | None
    label_emb: np.ndarray | None
    splits: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    label_prompts: list[str] = field(default_factory=list)
    val: ImageSet | None = None
    val_texts: list[str] = field(default_factory=list)
    val_captions: np.ndarray | None = None
    val_caption_image: list[int] = field(default_factory=list)
    val_labels: list[str | None] = field(default_factory=list)
    val_label_names: list[str] = field(default_factory=list)
    val_label_emb: np.ndarray | None = None
    val_label_prompts: list[str] = field(default_factory=list)


def decode_images(paths: list[Path], size: int, progress: bool = True) -> np.ndarray:
    """(n, size, size, 3) uint8: each image padded to a square and resized, as `to_pixel_values` does."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="decoding images", disable=not progress, unit="img")):
        out[i] = square_resized(read_rgb(path), size)
    return out


def load_align_data(recipe: Recipe, cfg: AlignConfig, tower: GeoHybridVisionModel, text_encoder: TextEncoder,
                    progress: bool = True) -> AlignData:
    """Read `cfg.annotations` and encode what stays frozen: captions and labels (MiniLM), and either the
    stem's features of each quarter turn (cached on disk) or, training from pixels, the decoded images."""
    ann = recipe.path(cfg.annotations)
    seed = recipe.run.seed
    cache_dir = recipe.path(recipe.run.cache_dir) if recipe.run.cache_dir else cache_root() / "align"
    mean, std = recipe.assistant_config("align").image_mean, recipe.assistant_config("align").image_std
    turns = quarter_turns(cfg.rotations)

    def images(groups: list[list[Path]]) -> ImageSet:
        """The images of each group (a split's), in order; each group cached on its own, so a stage that
        adds a split reuses the caches of the others."""
        if from_pixels(tower):
            return ImageSet([joined([decode_images(g, tower.config.image_size, progress) for g in groups])], turns)
        return ImageSet([joined([cache_stem_features(tower, g, cache_dir, mean, std, progress, k) for g in groups])
                         for k in turns], turns)

    groups = [_rows(ann, split) for split in cfg.split.split("+")]  # `train+val`: both splits
    train_rows = [r for group in groups for r in group]
    if len(train_rows) < 2:
        raise GeoChatError(f"{ann}: fewer than 2 captioned rows in split {cfg.split!r}")
    starts = np.cumsum([0] + [len(r["captions"]) for r in train_rows])
    text_all = joined([cache_text_embeddings([c for r in group for c in r["captions"]], cache_dir,
                                             text_encoder.directory, progress) for group in groups])  # (captions, D)
    picked = subset(len(train_rows), cfg.max_images, seed)
    group_of = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    data = AlignData(
        train=images([[(ann.parent / train_rows[i]["image"]).resolve() for i in picked if group_of[i] == g]
                      for g in range(len(groups))]),
        text=text_all, spans=[(int(starts[i]), int(starts[i + 1])) for i in picked], label_idx=None, label_emb=None,
        splits=[str(train_rows[i].get("split")) for i in picked], captions=[c for r in train_rows for c in r["captions"]],
    )
    label_names = sorted({str(r["label"]) for r in train_rows if r.get("label")})
    if cfg.label_weight:
        if len(label_names) < 2:
            raise GeoChatError(f"{ann}: label_weight needs at least 2 labels in split {cfg.split!r}")
        data.label_emb = label_embeddings(text_encoder, label_names)
        data.label_prompts = label_prompts(label_names)
        index = {name: k for k, name in enumerate(label_names)}
        data.label_idx = np.array([index.get(str(train_rows[i].get("label")), -1) for i in picked])

    val_rows = _rows(ann, cfg.val_split) if cfg.val_split else []
    if val_rows:
        val_rows = [val_rows[i] for i in subset(len(val_rows), cfg.val_max, seed)]
        data.val = images([[(ann.parent / r["image"]).resolve() for r in val_rows]])
        data.val_texts = [c for r in val_rows for c in r["captions"]]
        data.val_captions = text_encoder.encode(data.val_texts)
        data.val_caption_image = [i for i, r in enumerate(val_rows) for _ in r["captions"]]
        data.val_labels = [r.get("label") for r in val_rows]
        data.val_label_names = sorted({r["label"] for r in val_rows if r.get("label")})
        if len(data.val_label_names) > 1:
            data.val_label_emb = label_embeddings(text_encoder, data.val_label_names)
            data.val_label_prompts = label_prompts(data.val_label_names)
    return data


def augment(pixels: torch.Tensor, turns: list[int], mean: tuple, std: tuple, crop_min: float) -> torch.Tensor:
    """(B, S, S, 3) uint8 → (B, 3, S, S) normalised views for training from pixels: one sampling grid per
    image does a random crop (area `crop_min`..1, aspect 3:4..4:3) resized back to S, a random mirror and
    a random quarter turn from `turns`; then ±20 % brightness and contrast."""
    b, s = pixels.shape[0], pixels.shape[1]
    x = unit_scale(pixels)
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(crop_min, 1.0)
    low, high = area.log().clamp(min=math.log(3 / 4)), (-area.log()).clamp(max=math.log(4 / 3))  # crop inside
    aspect = (low + (high - low) * torch.rand(b, device=dev)).exp()
    sx, sy = (area * aspect).sqrt(), (area / aspect).sqrt()
    mirror = torch.randint(0, 2, (b,), device=dev).float() * 2 - 1
    scale = torch.zeros(b, 2, 2, device=dev)
    scale[:, 0, 0], scale[:, 1, 1] = sx * mirror, sy
    turn = torch.tensor(turns, device=dev)[torch.randint(0, len(turns), (b,), device=dev)].float() * (math.pi / 2)
    cos, sin = turn.cos().round(), turn.sin().round()
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # (B, 2, 2)
    shift = (1 - torch.stack([sx, sy], -1)) * (torch.rand(b, 2, device=dev) * 2 - 1)  # crop centre
    theta = torch.cat([rotate @ scale, shift.unsqueeze(-1)], dim=2)
    grid = F.affine_grid(theta, [b, 3, s, s], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    contrast = torch.empty(b, 1, 1, 1, device=dev).uniform_(0.8, 1.2)
    brightness = torch.empty(b, 1, 1, 1, device=dev).uniform_(0.8, 1.2)
    grey = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (((x - grey) * contrast + grey) * brightness).clamp(0.0, 1.0)
    return normalise(x, mean, std)


def run_align(recipe: Recipe, cfg: AlignConfig, directory: Path, accelerator: object | None = None,
              resume: bool = False, progress: bool = True, stop_after: int | None = None,
              start: Path | None = None, data: AlignData | None = None,
              stem_state: dict[str, torch.Tensor] | None = None) -> GeoHybridVisionModel:
    """Train the tower contrastively: the align stage, or (a `RetrievalConfig`) the retrieval stage's
    search tower with its `vision` overrides, from `start`'s tower if given. `data` (e.g. from a pack,
    `geochat.train.pack`) replaces reading the annotations and running the frozen encoders."""
    overrides = cfg.vision if isinstance(cfg, RetrievalConfig) else None  # None: the align stage
    stage = "align" if overrides is None else "retrieval"
    seed = recipe.run.seed
    mean, std = recipe.assistant_config("align").image_mean, recipe.assistant_config("align").image_std
    tower = build_tower(recipe, overrides, start, stem_state)
    if data is None:
        text_encoder = TextEncoder()
        if tower.config.projection_dim != text_encoder.dim:
            raise GeoChatError(f"model.vision.projection_dim must be {text_encoder.dim} (the text encoder's size)")
        data = load_align_data(recipe, cfg, tower, text_encoder, progress)
    pixels = from_pixels(tower)
    if not pixels and not tower.stem_is_frozen:
        # a trainable conv stem whose output is cached never runs here, so it cannot train (and under DDP
        # a trained parameter that is never used is an error)
        tower.stem.requires_grad_(False)

    def new_head() -> TextHead | None:
        if not (isinstance(cfg, RetrievalConfig) and cfg.text_head):
            return None
        return TextHead(tower.config.projection_dim, cfg.text_layers, cfg.text_rank)

    model = AlignModel(tower, cfg.temperature, new_head())
    if model.reads_text and not data.captions:
        raise GeoChatError("text_layers trains MiniLM on the captions themselves, and this data holds only their "
                           "embeddings (a pack): train with text_layers: 0, or from the annotations")
    trainer = Trainer(stage, model, cfg.optim, recipe.run, directory, accelerator,
                      lr_scales={"tower.stem.": cfg.stem_lr_scale})
    if resume:
        trainer.load_checkpoint()
    device = next(trainer.module.parameters()).device
    bs = cfg.optim.batch_size
    if pixels and device.type == "cpu":
        log.warning("training every EfficientNet block from pixels on the CPU: about 15 s per step of 128 images "
                    "on 2 cores (benchmarks/train_step_time.py); a GPU takes about 0.1 s per step of 256")
    train = data.train
    # training from pixels: the decoded images on the GPU once, if there is one (augmenting there is cheap)
    on_device = torch.from_numpy(np.ascontiguousarray(train.arrays[0])).to(device) if pixels else None
    text_all = torch.from_numpy(np.asarray(data.text, dtype=np.float32)).to(device)
    label_emb: torch.Tensor | list[str] | None = None
    if data.label_emb is not None:
        label_emb = data.label_prompts if model.reads_text else torch.from_numpy(data.label_emb).to(device)

    def loss_fn(micro_step: int) -> torch.Tensor:
        from geochat.train.loop import batch_indices

        rng = np.random.RandomState(seed + micro_step)
        idx = batch_indices(len(train), bs, micro_step, seed)
        cap = [rng.randint(*data.spans[i]) for i in idx]
        view = rng.randint(len(train.arrays), size=len(idx))
        keep = trainer.shard(list(range(len(idx))))
        idx, cap, view = [idx[k] for k in keep], [cap[k] for k in keep], view[keep]
        owner = None
        if cfg.captions == "all":
            cap = [c for i in idx for c in range(*data.spans[i])]
            owner = torch.tensor([k for k, i in enumerate(idx) for _ in range(*data.spans[i])], device=device)
        if on_device is not None:
            inputs = augment(on_device[torch.tensor(idx, device=device)], train.turns, mean, std, cfg.crop_min)
        else:
            inputs = torch.from_numpy(np.stack([np.asarray(train.arrays[v][i], dtype=np.float32)
                                                for i, v in zip(idx, view, strict=True)])).to(device)
        labels = torch.from_numpy(data.label_idx[idx]).to(device) if data.label_idx is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.run.autocast == "bf16"):
            text = [data.captions[c] for c in cap] if model.reads_text else text_all[torch.tensor(cap, device=device)]
            return trainer.module(inputs, text, labels, label_emb, cfg.label_weight, owner)

    eval_fn = _val_fn(model, data, device, mean, std) if data.val is not None else None
    trainer.fit(loss_fn, eval_fn, progress, stop_after)
    gathered = trainer.gathered_state()  # every process: under FSDP the weights are gathered whole
    if trainer.is_main:
        if gathered is not None:  # FSDP sharded the tower in place: a fresh copy takes the trained weights
            tower = build_tower(recipe, overrides, start, stem_state)
            model = AlignModel(tower, cfg.temperature, new_head())
            model.load_state_dict(gathered)
            model.to(device)
        bank = None
        if isinstance(cfg, RetrievalConfig) and cfg.query_bank:
            model.eval()
            bank = build_query_bank(model, data, device, mean, std, cfg.bank_split)
        save_tower(tower.cpu(), directory)
        if model.text_head is not None:
            save_text_head(model.text_head.cpu(), directory)
        if bank is not None:
            save_query_bank(bank, directory)
        trainer.plot()
    return tower


VAL_BATCH = 64


@torch.no_grad()
def embed_image_set(model: AlignModel, images: ImageSet, device: torch.device, mean: tuple, std: tuple) -> np.ndarray:
    """(n, D) unit vectors of a split's images, each the mean over its quarter turns, as in use."""

    def embed_view(k: int, view: int) -> torch.Tensor:
        out = []
        for a in range(0, len(images), VAL_BATCH):
            if from_pixels(model.tower):  # decoded pixels, turned here
                x = torch.from_numpy(np.ascontiguousarray(images.arrays[0][a : a + VAL_BATCH])).to(device)
                x = torch.rot90(normalise(unit_scale(x), mean, std), k, dims=(2, 3))
            else:
                x = torch.from_numpy(np.asarray(images.arrays[view][a : a + VAL_BATCH], dtype=np.float32)).to(device)
            out.append(model.embed(x).float().cpu())
        return torch.cat(out)

    return mean_of_views([embed_view(k, v) for v, k in enumerate(images.turns)]).numpy()


def build_query_bank(model: AlignModel, data: AlignData, device: torch.device, mean: tuple, std: tuple,
                     split: str | None = None) -> QueryBank:
    """The `QueryBank` of a trained tower: its training images' embeddings (those of `split`, if given), keyed by
    their caption centroids (in the search space: through the model's text head, if any)."""
    rows = [i for i, name in enumerate(data.splits) if split is None or name == split]
    text = torch.from_numpy(model.embed_text_array(data.captions if model.reads_text else data.text, device))
    keys = F.normalize(torch.stack([text[slice(*data.spans[i])].mean(0) for i in rows]), dim=-1)
    images = data.train if len(rows) == len(data.train) else ImageSet([a[rows] for a in data.train.arrays],
                                                                       data.train.turns)
    return QueryBank(keys, torch.from_numpy(embed_image_set(model, images, device, mean, std)))


def _val_fn(model: AlignModel, data: AlignData, device: torch.device, mean: tuple,
            std: tuple) -> Callable[[], dict[str, float]]:
    assert data.val is not None and data.val_captions is not None
    val = data.val
    captions = data.val_texts if model.reads_text else data.val_captions
    label_emb = data.val_label_prompts if model.reads_text else data.val_label_emb

    def eval_fn() -> dict[str, float]:
        z = embed_image_set(model, val, device, mean, std)
        recalls = retrieval_recalls(z, model.embed_text_array(captions, device), data.val_caption_image)
        out = {k: v for k, v in recalls.items() if k in ("t2i_R@1", "t2i_R@10")}
        if label_emb is not None and data.val_label_emb is not None:
            pred = (z @ model.embed_text_array(label_emb, device, labels=True).T).argmax(1)
            names = data.val_label_names
            out["zero_shot_acc"] = float(np.mean([names[p] == label for p, label in zip(pred, data.val_labels, strict=True)]))
        return out

    return eval_fn
