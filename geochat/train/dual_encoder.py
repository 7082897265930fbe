"""The dual encoder: the hybrid tower's pooled head ↔ frozen MiniLM sentence embeddings.

Images and text share MiniLM's 384-d space: the text side is all-MiniLM-L6-v2 as shipped (frozen,
L2-normalised; a retrieval stage with `text_head: true` adds a trained residual linear map on top, `TextHead`),
the image side is the tower's `pooler_output` (mean of its patch tokens through a linear head), trained
contrastively by the align stage to land next to the image's captions. That
one space serves zero-shot scene classification (image vs label prompts), text→image and
image→image search, and the image side of retrieval.

Overhead images have no canonical "up", so an image's embedding is the mean of the tower's embeddings
of its four 90° rotations (`ROTATIONS`; renormalised). On RSICD val that raised text→image R@10 from
0.310 to 0.338 and zero-shot accuracy from 0.848 to 0.879 over one view (eight dihedral views: 0.337 /
0.885), for four tower passes per image.

A tower is stored as `vision/config.json` + `vision/model.safetensors` (the frozen ImageNet stem
left out; it ships in its own package), the same layout an assistant directory uses, so both an
align-stage output and a full assistant directory load here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from geochat.errors import ModelLoadError
from geochat.model.assistant import RETRIEVAL_DIR, VISION_DIR
from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
from geochat.model.processor import to_pixel_values

log = logging.getLogger(__name__)

# Prompts around a label for zero-shot classification; their embeddings are averaged (prompt ensemble).
LABEL_PROMPTS = (
    "an aerial image of {}.",
    "a satellite image of {}.",
    "a remote sensing image showing {}.",
)


class TextEncoder:
    """Frozen sentence-transformers encoder (MiniLM by default): texts → (n, D) unit vectors."""

    def __init__(self, directory: Path | None = None, model: Any = None) -> None:
        """`model`: an already loaded SentenceTransformer of `directory` (e.g. `TextHead.minilm`, adapted)."""
        from geochat.model.weights import minilm_dir

        self.directory = directory or minilm_dir()
        self.model: Any = model if model is not None else load_sentence_model(self.directory)

    @property
    def dim(self) -> int:
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ModelLoadError(f"{self.directory} does not declare its embedding size")
        return int(dim)

    def encode(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        emb = self.model.encode(
            list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
            show_progress_bar=progress,
        )
        return np.asarray(emb, dtype=np.float32)


def load_sentence_model(directory: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(directory), device="cpu")


ROTATIONS = 4
QUERY_BANK = "query_bank.safetensors"  # beside a tower's vision/: `QueryBank`, when its stage wrote one


def quarter_turns(rotations: int) -> list[int]:
    """The quarter turns of `rotations` evenly spaced views (1 → [0], 2 → [0, 2], 4 → [0, 1, 2, 3])."""
    if rotations not in (1, 2, 4):
        raise ValueError(f"rotations must be 1, 2 or 4, got {rotations}")
    return [k * (4 // rotations) for k in range(rotations)]


def mean_of_views(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """One unit vector per image from its views' embeddings: the renormalised mean of their unit vectors."""
    return F.normalize(torch.stack([F.normalize(v.float(), dim=-1) for v in views]).mean(0), dim=-1)


@torch.no_grad()
def tower_embedding(tower: GeoHybridVisionModel, pixels: torch.Tensor, rotations: int = ROTATIONS) -> np.ndarray:
    """(B, 3, S, S) pixel values → (B, D) unit vectors: the mean over `rotations` quarter turns (1, 2 or 4)."""
    views = [tower(pixel_values=torch.rot90(pixels, k, dims=(2, 3))).pooler_output for k in quarter_turns(rotations)]
    return mean_of_views(views).numpy()


def label_text(label: str) -> str:
    """Label as prose: `denseresidential` stays as written, `bare_land` → `bare land`."""
    return label.replace("_", " ").replace("-", " ")


def save_tower(tower: GeoHybridVisionModel, directory: Path) -> Path:
    """Write `directory/vision/` (config + trainable weights; the frozen shipped stem left out)."""
    out = directory / VISION_DIR
    out.mkdir(parents=True, exist_ok=True)
    state = tower.saved_state_dict()
    tower.config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"))
    return out


def tower_weights(directory: Path) -> Path:
    """The trained weights file of the tower saved under `directory` (it may not exist)."""
    return directory / VISION_DIR / "model.safetensors"


def tower_fingerprint(directory: Path) -> str:
    """A digest of the tower saved in `directory` that stays the same when its float32 weights are stored
    as float16 (`store_as_float16`): the query bank records it to know which tower its image rows came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(tower_weights(directory))).items()):
        h.update(name.encode())
        h.update((tensor.half() if tensor.is_floating_point() else tensor).numpy().tobytes())
    return h.hexdigest()[:16]


def search_tower_dir(directory: Path) -> Path:
    """Where the dual encoder's tower lives: `directory/retrieval/` when a retrieval stage made one."""
    search = directory / RETRIEVAL_DIR
    return search if tower_weights(search).is_file() else directory


def load_tower(directory: Path) -> GeoHybridVisionModel:
    """The hybrid tower saved under `directory/vision/` (an align output or an assistant directory)."""
    vision, weights = directory / VISION_DIR, tower_weights(directory)
    if not weights.is_file():
        raise ModelLoadError(f"'{directory}' holds no trained vision tower ({weights} missing)")
    config = GeoHybridVisionConfig.from_pretrained(vision)
    tower = GeoHybridVisionModel(config)
    tower.load_stem_weights()
    result = tower.load_state_dict(load_file(str(weights)), strict=False)
    missing = [k for k in result.missing_keys if tower.is_saved_weight(k)]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"vision weights in {vision} do not fit: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return tower.eval()


TEXT_HEAD = "text_head.safetensors"  # beside a tower's vision/: `TextHead`, when its stage trained one


class TextHead(nn.Module):
    """The search space's own text side: t → normalise(t + W·t + b) on MiniLM's unit vectors. W and b start
    at zero (an untrained head is the identity) and train with the tower (`text_head: true`), so captions
    and label prompts can move toward what the image side can see. MiniLM itself stays frozen and shared
    with documentation retrieval, which never goes through the head.

    With `layers` (`text_layers: N`), t itself comes from the head's own copy of MiniLM (`minilm`) whose top
    N transformer layers carry LoRA adapters of rank `rank` (zero at the start, so again the identity), trained
    with the tower; documentation retrieval keeps the shared, untouched MiniLM."""

    def __init__(self, dim: int, layers: int = 0, rank: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.layers, self.rank = layers, rank
        self.minilm: Any = self._adapted_minilm(layers, rank) if layers else None

    @staticmethod
    def _adapted_minilm(layers: int, rank: int) -> Any:
        from peft import LoraConfig, inject_adapter_in_model

        from geochat.model.weights import minilm_dir

        model = load_sentence_model(minilm_dir())
        bert = model[0].auto_model
        total = bert.config.num_hidden_layers
        if not 0 < layers <= total:
            raise ValueError(f"text_layers must be 1..{total} (MiniLM's layers), got {layers}")
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_MODULES),
                            layers_to_transform=list(range(total - layers, total)), layers_pattern="layer")
        inject_adapter_in_model(config, bert)
        for name, param in bert.named_parameters():
            param.requires_grad_("lora_" in name)
            if "lora_A" in name:  # std 1/sqrt(fan-in): the scale the recipe's learning rate was chosen with
                nn.init.normal_(param, std=param.shape[1] ** -0.5)
        model.eval()
        return model

    def train(self, mode: bool = True) -> TextHead:
        """Dropout only where the adapters are: MiniLM's frozen lower layers stay as in use."""
        super().train(mode)
        if self.minilm is not None:
            self.minilm.eval()
            bert = self.minilm[0].auto_model
            for layer in bert.encoder.layer[bert.config.num_hidden_layers - self.layers:]:
                layer.train(mode)
        return self

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(text + self.proj(text.to(self.proj.weight.dtype)), dim=-1)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → (n, D) unit vectors from the adapted MiniLM (before `forward`), with gradients."""
        assert self.minilm is not None, "a head without text_layers works on MiniLM's vectors"
        device = self.proj.weight.device
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in self.minilm.preprocess(list(texts)).items()}
        return F.normalize(self.minilm(features)["sentence_embedding"].float(), dim=-1)

    def encoder(self) -> TextEncoder:
        """The adapted MiniLM as a `TextEncoder` (captions, label prompts and queries in inference)."""
        from geochat.model.weights import minilm_dir

        assert self.minilm is not None
        return TextEncoder(minilm_dir(), model=self.minilm)

    @torch.no_grad()
    def transform(self, text: np.ndarray) -> np.ndarray:
        """(n, D) unit vectors → (n, D) unit vectors in the search space."""
        return self(torch.tensor(np.asarray(text), dtype=torch.float32)).numpy()

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What a head file holds: the linear map, and the adapters (MiniLM itself ships in its package)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if k.startswith("proj.") or "lora_" in k}


LORA_MODULES = ("query", "key", "value", "dense")  # every linear map of a BERT layer (attention, output, MLP)


def save_text_head(head: TextHead, directory: Path) -> Path:
    """Write `head` beside the tower saved in `directory`, stamped with that tower's fingerprint."""
    path = directory / TEXT_HEAD
    save_file(head.saved_state(), str(path), metadata={"tower": tower_fingerprint(directory),
                                                       "layers": str(head.layers), "rank": str(head.rank)})
    return path


def load_text_head(directory: Path) -> TextHead | None:
    """The text head trained with the tower in `directory`, if there is one. A head found beside another
    tower is an error: its text side would not match the images."""
    path = directory / TEXT_HEAD
    if not path.is_file() or not tower_weights(directory).is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        head = TextHead(state["proj.weight"].shape[1], int(meta.get("layers", 0)), int(meta.get("rank", 8)))
        expected = head.saved_state()
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            raise KeyError(f"tensors {sorted(set(state) ^ set(expected))[:4] or 'of other shapes'}")
        head.load_state_dict(state, strict=False)
    except (KeyError, RuntimeError, OSError, SafetensorError) as exc:
        raise ModelLoadError(f"{path} is not a text head ({exc}): retrain the retrieval stage") from exc
    if meta.get("tower") and meta["tower"] != tower_fingerprint(directory):
        raise ModelLoadError(f"{path} was trained with another tower than the one in {directory / VISION_DIR}: "
                             "retrain the retrieval stage (or remove the stale head and its query bank)")
    return head.eval()


@dataclass(frozen=True, eq=False)  # tensors: no field-wise ==
class QueryBank:
    """Text-query expansion through the training images: a query moves toward the images whose captions
    it resembles, in the tower's own image space.

        w = softmax over [cos(q, key_i) / tau for the k nearest keys] + [floor / tau]
        q' = normalise(q + weight · (Σ w_i) · normalise(Σ w_i value_i))

    `keys` (n, D): each training image's caption centroid (MiniLM); `values` (n, D): the tower's embedding of
    that image (the mean over the stage's quarter turns: four in the shipped recipe). Only search queries are expanded, never label prompts. The `floor` is a key that
    pulls nowhere: a query that resembles no training caption better than it (cosine 0.55; RSICD val queries
    are above 0.56 for 99 % of them, phrases like "solar farm" or "ship wake in a SAR image" at 0.38-0.47) is
    left nearly as it is instead of being pulled toward the nearest training scenes. The defaults are the best
    of a grid on RSICD val with the shipped tower (k 10/30, tau 0.03-0.1, weight 0.2-0.5, floor 0.4-0.6, which
    left val unchanged; MODEL_CARD.md).
    Stored as per-row int8 with float16 scales (6.7 MB for RSICD's 8,734 training images), with the
    `tower_fingerprint` of the tower that embedded the values (`tower`; "" in banks written before it).

    The keys also correct hubness on the image side (`image_offsets`): some images sit close to many captions
    and would top the results of any query like them. A text query ranks image z by cos(q', z) minus
    hub_weight · max(LSE_β(cos(z, key_i)) / β − c, hub_floor), where LSE_β is the log-sum-exp of β · cosine
    over all keys (a soft maximum: how crowded the image's neighbourhood of training captions is) and c its
    mean over the bank's own image rows, so corrected scores stay on the cosine scale. The floor bounds the
    lift of an image whose neighbourhood is empty: a scene unlike every training caption (another sensor, a
    map) would otherwise climb over better matches for no reason but its strangeness. One offset per image:
    it leaves an image's ranking of labels or captions alone. β 30, weight 0.75 and floor -0.05 are the best
    of grids on RSICD val with the shipped tower and bank (β 10-50, weight 0.25-1, floor -0.1-0; MODEL_CARD.md).
    """

    keys: torch.Tensor
    values: torch.Tensor
    k: int = 10
    tau: float = 0.03
    weight: float = 0.2
    floor: float = 0.55
    tower: str = ""
    hub_weight: float = 0.75
    hub_beta: float = 30.0
    hub_floor: float = -0.05
    hub_centre: float | None = None  # c, written with the bank (computed from it when missing)

    def __post_init__(self) -> None:
        if self.keys.ndim != 2 or self.keys.shape != self.values.shape or not len(self.keys):
            raise ValueError(f"keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} must be two "
                             "non-empty (n, D) tables of one shape")
        if self.k < 1 or not self.tau > 0 or not self.weight >= 0:
            raise ValueError(f"needs k >= 1, tau > 0 and weight >= 0 (k {self.k}, tau {self.tau}, weight {self.weight})")
        if not self.hub_beta > 0 or not self.hub_weight >= 0 or not self.hub_floor <= 0:
            raise ValueError(f"needs hub_beta > 0, hub_weight >= 0 and hub_floor <= 0 (hub_beta {self.hub_beta}, "
                             f"hub_weight {self.hub_weight}, hub_floor {self.hub_floor})")

    def expand(self, queries: np.ndarray) -> np.ndarray:
        """(Q, D) unit query vectors → (Q, D) expanded unit vectors."""
        q = torch.tensor(np.asarray(queries), dtype=torch.float32)  # a copy: read-only arrays are fine
        sim, idx = (q @ self.keys.T).topk(min(self.k, len(self.keys)), dim=1)
        w = F.softmax(torch.cat([sim, sim.new_full((len(q), 1), self.floor)], 1) / self.tau, dim=1)[:, :-1]
        pulled = F.normalize((w.unsqueeze(-1) * self.values[idx]).sum(1), dim=-1)
        return F.normalize(q + self.weight * w.sum(1, keepdim=True) * pulled, dim=-1).numpy()

    def image_offsets(self, images: np.ndarray) -> np.ndarray:
        """(n, D) unit image vectors → (n,) hubness offsets, to subtract from their text-query scores."""
        if not self.hub_weight:
            return np.zeros(len(images), np.float32)
        crowding = self._crowding(torch.tensor(np.asarray(images), dtype=torch.float32))
        return (self.hub_weight * (crowding - self._mean_crowding).clamp(min=self.hub_floor)).numpy()

    def _crowding(self, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """(n, D) → (n,): LSE_β of the cosines to every key, / β."""
        parts = [torch.logsumexp(self.hub_beta * (x @ self.keys.T), dim=1) / self.hub_beta
                 for x in images.split(chunk)]  # (chunk, n_keys) at a time
        return torch.cat(parts) if parts else images.new_zeros(0)

    @cached_property
    def _mean_crowding(self) -> float:
        """c: the stored value, or the mean crowding of the bank's own rows (an 8,734² pass for RSICD's bank)."""
        if self.hub_centre is not None:
            return self.hub_centre
        return float(self._crowding(F.normalize(self.values, dim=-1)).mean())

    def save(self, path: Path) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        for name, x in (("keys", self.keys), ("values", self.values)):
            scale = x.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
            tensors[name] = (x / scale).round().clamp(-127, 127).to(torch.int8)
            tensors[f"{name}_scale"] = scale.half()
        settings = {"k": self.k, "tau": self.tau, "weight": self.weight, "floor": self.floor, "tower": self.tower,
                    "hub_weight": self.hub_weight, "hub_beta": self.hub_beta, "hub_floor": self.hub_floor,
                    "hub_centre": self._mean_crowding}
        save_file(tensors, str(path), metadata={name: str(value) for name, value in settings.items()})
        return path

    @classmethod
    def load(cls, path: Path) -> QueryBank:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            keys, values = (t[n].float() * t[f"{n}_scale"].float() for n in ("keys", "values"))
            # banks written before the floor or the hubness correction get today's settings
            floor = float(meta.get("floor", cls.floor))
            hub_weight = float(meta.get("hub_weight", cls.hub_weight))
            hub_beta, hub_floor = float(meta.get("hub_beta", cls.hub_beta)), float(meta.get("hub_floor", cls.hub_floor))
            centre = float(meta["hub_centre"]) if "hub_centre" in meta else None
            return cls(keys, values, int(meta["k"]), float(meta["tau"]), float(meta["weight"]), floor,
                       meta.get("tower", ""), hub_weight, hub_beta, hub_floor, centre)
        except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as exc:
            raise ModelLoadError(f"{path} is not a query bank ({exc}); rewrite it with "
                                 "`python -m geochat.train.query_bank RECIPE DIR`") from exc


def save_query_bank(bank: QueryBank, directory: Path) -> Path:
    """Write `bank` beside the tower saved in `directory`, stamped with that tower's fingerprint."""
    return replace(bank, tower=tower_fingerprint(directory)).save(directory / QUERY_BANK)


def load_query_bank(directory: Path) -> QueryBank | None:
    """The query bank saved beside the tower in `directory`, if there is one and it was built from that tower
    (a bank left beside a retrained tower would pull queries toward the old tower's image rows: it is skipped,
    with a warning)."""
    path = directory / QUERY_BANK
    if not path.is_file() or not tower_weights(directory).is_file():
        return None
    bank = QueryBank.load(path)
    dim = GeoHybridVisionConfig.from_pretrained(directory / VISION_DIR).projection_dim
    if bank.keys.shape[1] != dim:
        raise ModelLoadError(f"the query bank in {directory} holds {bank.keys.shape[1]}-d rows, its tower {dim}-d: "
                             f"rewrite it with `python -m geochat.train.query_bank RECIPE {directory}`")
    if bank.tower and bank.tower != tower_fingerprint(directory):
        log.warning("%s was built for another tower than the one in %s; searching without it (rewrite it with "
                    "`python -m geochat.train.query_bank RECIPE %s`)", path, directory / VISION_DIR, directory)
        return None
    return bank


def search_encoder(text_head: TextHead | None) -> TextEncoder | None:
    """The encoder of search texts where the head brings its own (its adapted MiniLM, `text_layers`); None: the
    texts are MiniLM's shared vectors."""
    return text_head.encoder() if text_head is not None and text_head.minilm is not None else None


def search_queries(emb: np.ndarray, text_head: TextHead | None, bank: QueryBank | None = None) -> np.ndarray:
    """MiniLM's (n, D) unit vectors → the search space's: through the text head, then (search queries only)
    expanded through the query bank; each step only where the tower has one."""
    if not len(emb):
        return emb
    if text_head is not None:
        emb = text_head.transform(emb)
    return bank.expand(emb) if bank is not None else emb


class DualEncoder:
    """Image and text embeddings in one space; cosine similarity = dot product of the outputs.
    With a `text_head`, texts and label prompts go through it (`TextHead`); with a `bank`, search queries
    (`embed_queries`) are then expanded through it (`QueryBank`)."""

    def __init__(self, tower: GeoHybridVisionModel, text: TextEncoder,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 rotations: int = ROTATIONS, bank: QueryBank | None = None, text_head: TextHead | None = None) -> None:
        if tower.config.projection_dim != text.dim:
            raise ModelLoadError(
                f"the tower's head gives {tower.config.projection_dim}-d embeddings, the text encoder {text.dim}-d"
            )
        self.tower = tower.eval()
        self.text = text
        self.mean, self.std = tuple(mean), tuple(std)
        self.rotations = rotations
        self.bank = bank
        self.text_head = text_head
        self.search_text = search_encoder(text_head) or text

    def embed_images(self, rgbs: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """(h, w, 3) uint8 images → (n, D) unit vectors (`tower_embedding`: mean over rotations)."""
        size = self.tower.config.image_size
        out = []
        for start in range(0, len(rgbs), batch_size):
            pixels = torch.cat([to_pixel_values(x, size, self.mean, self.std) for x in rgbs[start : start + batch_size]])
            out.append(tower_embedding(self.tower, pixels, self.rotations))
        return np.concatenate(out) if out else np.zeros((0, self.text.dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return search_queries(self.search_text.encode(texts), self.text_head)

    def image_offsets(self, images: np.ndarray) -> np.ndarray | None:
        """(n, D) image embeddings → (n,) offsets to subtract from text-query scores (the bank's hubness
        correction; None without a bank)."""
        return self.bank.image_offsets(images) if self.bank is not None else None

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Search queries: `embed_texts`, expanded through the query bank when there is one."""
        return search_queries(self.search_text.encode(texts), self.text_head, self.bank)

    def embed_labels(self, labels: Sequence[str]) -> np.ndarray:
        return search_queries(label_embeddings(self.search_text, labels), self.text_head)


def label_prompts(labels: Sequence[str]) -> list[str]:
    """Each label's `LABEL_PROMPTS`, in a row (what `label_embeddings` averages)."""
    return [p.format(label_text(label)) for label in labels for p in LABEL_PROMPTS]


def label_embeddings(text: TextEncoder, labels: Sequence[str]) -> np.ndarray:
    """(L, D) unit vectors: the mean embedding of each label's prompts, renormalised."""
    emb = text.encode(label_prompts(labels)).reshape(len(labels), len(LABEL_PROMPTS), -1).mean(1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)
