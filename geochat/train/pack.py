"""A training pack: the retrieval stage's data with the frozen encoders already run, in one folder.

Training the search tower from pixels (`retrieval.vision.trainable_stem_blocks` > 4) wants a GPU, and
the machine that has one may have neither the dataset nor MiniLM nor the EfficientNet weight package.
A pack holds what `run_align` reads: the decoded images re-encoded as WebP, the caption and label
embeddings, and the ImageNet stem's tensors. No pickles: numpy arrays read with `allow_pickle=False`,
and safetensors.

    python -m geochat.train.pack write adapters/geochat-mini.yaml PACK            # here
    python -m geochat.train.pack train adapters/geochat-mini.yaml PACK OUT        # on the GPU machine

`train` runs the same `run_align` as `geochat train` does, on the pack instead of the annotations,
and writes `OUT/retrieval/` (the tower, its log and loss plot); `--max-steps`, `--lr` and
`--stem-lr-scale` override the recipe for a sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from geochat.errors import GeoChatError
from geochat.model.hybrid_tower import CACHEABLE_TAIL
from geochat.train.align import AlignData, ImageSet, build_tower, load_align_data, run_align
from geochat.train.dual_encoder import TextEncoder
from geochat.train.recipe import Recipe, load_recipe
from geochat.train.run import _accelerator, _jsonable

DATA = "data.npz"
STEM = "stem.safetensors"


def _webp_blob(images: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, S, S, 3) uint8 → one byte array of WebP files and their n + 1 offsets."""
    def encode(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "WEBP", quality=quality, method=6)
        return buffer.getvalue()

    with ThreadPoolExecutor() as pool:
        files = list(pool.map(encode, images))
    offsets = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
    return np.frombuffer(b"".join(files), dtype=np.uint8), offsets


def _unblob(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    def decode(i: int) -> np.ndarray:
        with Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())) as im:
            return np.asarray(im.convert("RGB"))

    with ThreadPoolExecutor() as pool:
        return np.stack(list(pool.map(decode, range(len(offsets) - 1))))


def _quantise(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors → int8 unique rows, their scales, and each input row's index among them (captions
    repeat a lot). Cosine similarities move by about 1e-3."""
    unique, index = np.unique(rows, axis=0, return_inverse=True)
    scale = np.abs(unique).max(axis=1, keepdims=True) / 127.0
    return np.round(unique / scale).astype(np.int8), scale.astype(np.float32), index.astype(np.int32).ravel()


def _dequantise(q: np.ndarray, scale: np.ndarray, index: np.ndarray) -> np.ndarray:
    rows = q.astype(np.float32) * scale
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True))[index]


def write_pack(recipe: Recipe, directory: Path, quality: int = 50, val_images: bool = True,
               progress: bool = True) -> Path:
    """Write the recipe's retrieval-stage data to `directory` (see the module docstring); without
    `val_images` the validation split stays behind (to evaluate the saved tower where the data is)."""
    cfg = recipe.retrieval
    if cfg is None:
        raise ValueError("the recipe has no retrieval section")
    tower = build_tower(recipe, {**cfg.vision, "trainable_stem_blocks": 16})  # decoded pixels, whatever the recipe
    data = load_align_data(recipe, cfg, tower, TextEncoder(), progress)
    arrays: dict[str, np.ndarray] = {}
    arrays["train_webp"], arrays["train_offsets"] = _webp_blob(data.train.arrays[0], quality)
    arrays["text"], arrays["text_scale"], arrays["text_rows"] = _quantise(data.text)
    arrays["spans"] = np.array(data.spans, dtype=np.int64)
    if data.label_idx is not None and data.label_emb is not None:
        arrays["label_idx"], arrays["label_emb"] = data.label_idx, data.label_emb
    if val_images and data.val is not None and data.val_captions is not None:
        arrays["val_webp"], arrays["val_offsets"] = _webp_blob(data.val.arrays[0], quality)
        arrays["val_text"], arrays["val_text_scale"], arrays["val_text_rows"] = _quantise(data.val_captions)
        arrays["val_caption_image"] = np.array(data.val_caption_image, dtype=np.int64)
        arrays["val_labels"] = np.array([label or "" for label in data.val_labels])
        arrays["val_label_names"] = np.array(data.val_label_names)
        if data.val_label_emb is not None:
            arrays["val_label_emb"] = data.val_label_emb
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / DATA, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle
    stem = {k: v.to(torch.float16).contiguous() for k, v in tower.stem.state_dict().items()
            if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")}
    save_file(stem, str(directory / STEM))
    (directory / "pack.json").write_text(json.dumps({"recipe": recipe.name, "webp_quality": quality,
                                                     "train": len(data.train), "val": len(arrays.get("val_offsets", [1])) - 1}))
    return directory


def read_pack(directory: Path, turns: list[int]) -> tuple[AlignData, dict[str, torch.Tensor]]:
    """The `AlignData` of a pack (images decoded) and its stem tensors (float32)."""
    if not (directory / DATA).is_file() or not (directory / STEM).is_file():
        raise GeoChatError(f"{directory} is not a training pack (it needs {DATA} and {STEM}); "
                           "write one with `python -m geochat.train.pack write RECIPE.yaml PACK`")
    with np.load(directory / DATA, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    data = AlignData(
        train=ImageSet([_unblob(a["train_webp"], a["train_offsets"])], turns),
        text=_dequantise(a["text"], a["text_scale"], a["text_rows"]),
        spans=[(int(x), int(y)) for x, y in a["spans"]],
        label_idx=a.get("label_idx"), label_emb=a.get("label_emb"),
    )
    if "val_webp" in a:
        data.val = ImageSet([_unblob(a["val_webp"], a["val_offsets"])], turns)
        data.val_captions = _dequantise(a["val_text"], a["val_text_scale"], a["val_text_rows"])
        data.val_caption_image = [int(i) for i in a["val_caption_image"]]
        data.val_labels = [str(x) or None for x in a["val_labels"]]
        data.val_label_names = [str(x) for x in a["val_label_names"]]
        data.val_label_emb = a.get("val_label_emb")
    stem = {k: v.float() for k, v in load_file(str(directory / STEM)).items()}
    return data, stem


def train_from_pack(recipe: Recipe, pack: Path, output: Path, progress: bool = True,
                    accelerator: object | None = None) -> Path:
    """Run the recipe's retrieval stage on a pack; returns `output/retrieval`."""
    from geochat.train.dual_encoder import quarter_turns

    cfg = recipe.retrieval
    if cfg is None:
        raise ValueError("the recipe has no retrieval section")
    if {**recipe.model.vision, **cfg.vision}.get("trainable_stem_blocks", 0) <= CACHEABLE_TAIL:
        raise ValueError(f"a pack holds pixels: set retrieval.vision.trainable_stem_blocks above {CACHEABLE_TAIL}")
    data, stem = read_pack(pack, quarter_turns(cfg.rotations))
    directory = output / "retrieval"
    run_align(recipe, cfg, directory, accelerator, progress=progress, data=data, stem_state=stem)
    (output / "recipe.json").write_text(json.dumps(_jsonable(recipe), indent=2))
    return directory


def _override(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    cfg = recipe.retrieval
    assert cfg is not None
    steps = args.max_steps or cfg.optim.max_steps
    optim = dataclasses.replace(cfg.optim, max_steps=steps, lr=args.lr or cfg.optim.lr,
                                warmup_steps=min(cfg.optim.warmup_steps, steps))
    fields = {"optim": optim, **({"stem_lr_scale": args.stem_lr_scale} if args.stem_lr_scale else {})}
    return dataclasses.replace(recipe, retrieval=dataclasses.replace(cfg, **fields))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geochat.train.pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write the retrieval stage's pack")
    write.add_argument("recipe", type=Path)
    write.add_argument("pack", type=Path)
    write.add_argument("--quality", type=int, default=50, help="WebP quality of the images (default 50)")
    write.add_argument("--no-val-images", action="store_true", help="leave the validation images behind")
    train = sub.add_parser("train", help="train the retrieval stage from a pack")
    train.add_argument("recipe", type=Path)
    train.add_argument("pack", type=Path)
    train.add_argument("output", type=Path)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--stem-lr-scale", type=float)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    if args.command == "write":
        print(write_pack(recipe, args.pack, args.quality, not args.no_val_images), file=sys.stderr)
    else:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        out = train_from_pack(_override(recipe, args), args.pack, args.output, not args.quiet, _accelerator())
        print(out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
