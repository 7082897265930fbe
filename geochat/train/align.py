"""Align stage: the hybrid tower's pooled head learns MiniLM's caption space (CLIP loss).

    cached stem features (B, N, C) ─► tower blocks + head ─► normalise ─► image z (B, D)
    cached MiniLM caption embeddings, one random caption per image ─► text t (B, D)
    logits = exp(s) · z tᵀ ;  loss = (CE(logits, diag) + CE(logitsᵀ, diag)) / 2
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
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from geochat.eval.metrics import retrieval_recalls
from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
from geochat.paths import cache_root
from geochat.train.dual_encoder import (
    VISION_DIR,
    TextEncoder,
    label_embeddings,
    mean_of_views,
    quarter_turns,
    save_tower,
)
from geochat.train.features import cache_stem_features, cache_text_embeddings
from geochat.train.loop import Trainer
from geochat.train.recipe import AlignConfig, Recipe, RetrievalConfig

MAX_LOGIT_SCALE = math.log(100.0)


class AlignModel(nn.Module):
    """The trainable side: tower (stem frozen) + CLIP's learnable temperature."""

    def __init__(self, tower: GeoHybridVisionModel, temperature: float) -> None:
        super().__init__()
        self.tower = tower
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def embed(self, stem_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower(stem_features=stem_features).pooler_output, dim=-1)  # (B, D)

    def forward(self, stem_features: torch.Tensor, text: torch.Tensor, labels: torch.Tensor | None = None,
                label_emb: torch.Tensor | None = None, label_weight: float = 0.0) -> torch.Tensor:
        """The loss of a batch (a forward, so that data-parallel wrappers see the call)."""
        z = self.embed(stem_features)
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        logits = scale * z @ text.T  # (B, B)
        target = torch.arange(len(z))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        if label_weight and labels is not None and label_emb is not None:
            loss = loss + label_weight * F.cross_entropy(scale * z @ label_emb.T, labels, ignore_index=-1)
        return loss


def _rows(path: Path, split: str | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("captions") and (split is None or r.get("split") == split)]


def subset(n: int, k: int | None, seed: int) -> list[int]:
    """A seeded random subset of range(n), in order (the same rule everywhere caches are shared)."""
    return list(range(n)) if k is None or k >= n else sorted(random.Random(seed).sample(range(n), k))


def build_tower(recipe: Recipe, overrides: dict | None = None, start: Path | None = None) -> GeoHybridVisionModel:
    """The recipe's tower (`model.vision` + `overrides`), from `start`'s trained weights if given."""
    kwargs = {k: v for k, v in {**recipe.model.vision, **(overrides or {})}.items() if k != "model_type"}
    torch.manual_seed(recipe.run.seed)
    tower = GeoHybridVisionModel(GeoHybridVisionConfig(**kwargs))
    tower.load_stem_weights()
    if start is not None:
        result = tower.load_state_dict(load_file(str(start / VISION_DIR / "model.safetensors")), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"the tower in {start} does not fit: unexpected {result.unexpected_keys[:5]}")
    return tower


def run_align(recipe: Recipe, cfg: AlignConfig, directory: Path, accelerator: object | None = None,
              resume: bool = False, progress: bool = True, stop_after: int | None = None,
              start: Path | None = None) -> GeoHybridVisionModel:
    """Train the tower contrastively: the align stage, or (a `RetrievalConfig`) the retrieval stage's
    search tower with its `vision` overrides, from `start`'s tower if given."""
    overrides = cfg.vision if isinstance(cfg, RetrievalConfig) else None  # None: the align stage
    stage = "align" if overrides is None else "retrieval"
    ann = recipe.path(cfg.annotations)
    seed = recipe.run.seed
    cache_dir = recipe.path(recipe.run.cache_dir) if recipe.run.cache_dir else cache_root() / "align"
    mean, std = recipe.assistant_config("align").image_mean, recipe.assistant_config("align").image_std
    tower = build_tower(recipe, overrides, start)
    text_encoder = TextEncoder()
    if tower.config.projection_dim != text_encoder.dim:
        raise ValueError(f"model.vision.projection_dim must be {text_encoder.dim} (the text encoder's size)")

    train_rows = _rows(ann, cfg.split)
    if len(train_rows) < 2:
        raise ValueError(f"{ann}: fewer than 2 captioned rows in split {cfg.split!r}")
    all_captions = [c for r in train_rows for c in r["captions"]]
    starts = np.cumsum([0] + [len(r["captions"]) for r in train_rows])
    text_all = cache_text_embeddings(all_captions, cache_dir, text_encoder.directory, progress)  # (captions, D)
    picked = subset(len(train_rows), cfg.max_images, seed)
    images = [(ann.parent / train_rows[i]["image"]).resolve() for i in picked]
    turns = quarter_turns(cfg.rotations)
    stems = [cache_stem_features(tower, images, cache_dir, mean, std, progress, k) for k in turns]  # (n, N, C) f16
    spans = [(int(starts[i]), int(starts[i + 1])) for i in picked]

    label_names = sorted({str(r["label"]) for r in train_rows if r.get("label")})
    label_emb = label_idx = None
    if cfg.label_weight:
        if len(label_names) < 2:
            raise ValueError(f"{ann}: label_weight needs at least 2 labels in split {cfg.split!r}")
        label_emb = torch.from_numpy(label_embeddings(text_encoder, label_names))
        index = {name: k for k, name in enumerate(label_names)}
        label_idx = np.array([index.get(str(train_rows[i].get("label")), -1) for i in picked])

    model = AlignModel(tower, cfg.temperature)
    trainer = Trainer(stage, model, cfg.optim, recipe.run, directory, accelerator,
                      lr_scales={"tower.stem.": cfg.stem_lr_scale})
    if resume:
        trainer.load_checkpoint()
    bs = cfg.optim.batch_size

    def loss_fn(micro_step: int) -> torch.Tensor:
        from geochat.train.loop import batch_indices

        rng = np.random.RandomState(seed + micro_step)
        idx = batch_indices(len(images), bs, micro_step, seed)
        cap = [rng.randint(*spans[i]) for i in idx]
        view = rng.randint(len(stems), size=len(idx))
        keep = trainer.shard(list(range(len(idx))))
        idx, cap, view = [idx[k] for k in keep], [cap[k] for k in keep], view[keep]
        feats = torch.from_numpy(np.stack([np.asarray(stems[v][i], dtype=np.float32)
                                           for i, v in zip(idx, view, strict=True)]))
        labels = torch.from_numpy(label_idx[idx]) if label_idx is not None else None
        with torch.autocast(feats.device.type, dtype=torch.bfloat16, enabled=recipe.run.autocast == "bf16"):
            return trainer.module(feats, torch.from_numpy(text_all[cap]), labels, label_emb, cfg.label_weight)

    eval_fn = None
    if cfg.val_split:
        eval_fn = _val_fn(model, ann, cfg, tower, text_encoder, cache_dir, mean, std, seed, progress, turns)
    trainer.fit(loss_fn, eval_fn, progress, stop_after)
    if trainer.is_main:
        save_tower(tower, directory)
        trainer.plot()
    return tower


def _val_fn(model: AlignModel, ann: Path, cfg: AlignConfig, tower: GeoHybridVisionModel, text: TextEncoder,
            cache_dir: Path, mean: tuple, std: tuple, seed: int, progress: bool,
            turns: list[int]) -> Callable[[], dict[str, float]] | None:
    rows = _rows(ann, cfg.val_split)
    if not rows:
        return None
    rows = [rows[i] for i in subset(len(rows), cfg.val_max, seed)]
    paths = [(ann.parent / r["image"]).resolve() for r in rows]
    stems = [torch.from_numpy(np.asarray(cache_stem_features(tower, paths, cache_dir, mean, std, progress, k),
                                         dtype=np.float32)) for k in turns]
    captions = [c for r in rows for c in r["captions"]]
    caption_image = [i for i, r in enumerate(rows) for _ in r["captions"]]
    caption_emb = text.encode(captions)
    labels = sorted({r["label"] for r in rows if r.get("label")})
    label_emb = None
    if len(labels) > 1:
        label_emb = label_embeddings(text, labels)

    def eval_fn() -> dict[str, float]:
        z = mean_of_views([model.embed(stem) for stem in stems]).numpy()  # as in use (`tower_embedding`)
        out = {k: v for k, v in retrieval_recalls(z, caption_emb, caption_image).items() if k in ("t2i_R@1", "t2i_R@10")}
        if label_emb is not None:
            pred = (z @ label_emb.T).argmax(1)
            out["zero_shot_acc"] = float(np.mean([labels[p] == r.get("label") for p, r in zip(pred, rows, strict=False)]))
        return out

    return eval_fn
