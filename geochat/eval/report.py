"""A Markdown report of one evaluation: metrics table, per-class/type breakdown, figures, examples."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from geochat.eval.tasks import EvalResult

EXAMPLES_SHOWN = 10


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix (reference down, predicted across) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    size = max(4.0, 0.3 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title("confusion matrix (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(result: EvalResult, directory: Path, source: str, model: str, rows: str = "all") -> Path:
    """Write `report.md` (+ `confusion.png` for classify, `predictions.jsonl`) into `directory`; `rows` says
    which rows of `source` were scored (a split, a --limit or a --sample: a score means little without it)."""
    directory.mkdir(parents=True, exist_ok=True)
    m = result.metrics
    lines = [f"# geochat eval {m['task']}", "", f"- annotations: `{source}`", f"- rows: {rows}",
             f"- model: `{model}`", f"- items: {m['n']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items() if k not in ("task", "n", "per_class", "per_type")]
    for key in ("per_class", "per_type"):
        if key in m:
            lines += ["", f"## {key.replace('_', ' ')}", "", "| group | accuracy |", "|---|---|"]
            lines += [f"| {g} | {v:.4f} |" for g, v in m[key].items()]
    if result.confusion is not None:
        plot_confusion(result.confusion, result.labels, directory / "confusion.png")
        lines += ["", "## confusion matrix", "", "![confusion matrix](confusion.png)"]
    if result.predictions:
        with open(directory / "predictions.jsonl", "w", encoding="utf-8") as f:
            for p in result.predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        lines += ["", f"## first {min(EXAMPLES_SHOWN, len(result.predictions))} predictions", "", "```"]
        lines += [json.dumps(p, ensure_ascii=False) for p in result.predictions[:EXAMPLES_SHOWN]]
        lines += ["```", "", "All predictions: `predictions.jsonl`."]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
