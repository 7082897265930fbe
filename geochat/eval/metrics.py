"""The metrics the field reports, as plain functions of predictions and references.

- classification and VQA: accuracy (VQA answers normalised as the VQA benchmark does: lower case,
  punctuation and articles dropped, number words as digits), broken down by class / question type;
- retrieval: Recall@K both ways (text→image: a caption finds its own image in the top K;
  image→text: any of the image's captions is in the top K);
- captions: BLEU-1..4, METEOR, ROUGE-L and CIDEr from `pycocoevalcap`, the COCO caption evaluation
  code that papers report (PTB tokenisation first; METEOR and the tokenizer run Java);
- grounding: acc@0.5, the share of reference boxes matched one-to-one by a predicted box with
  rotated IoU >= 0.5 (`geochat.box_geometry.rotated_iou`, so oriented boxes are compared exactly).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np

from geochat.box_geometry import rotated_iou
from geochat.grounding import Box

CAPTION_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
RECALL_KS = (1, 5, 10)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references, strict=False)) / len(references)


def accuracy_by(predictions: Sequence[str], references: Sequence[str], groups: Sequence[str]) -> dict[str, float]:
    """Accuracy within each group (class or question type), groups sorted by name."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for p, r, g in zip(predictions, references, groups, strict=True):
        hits[g].append(p == r)
    return {g: sum(v) / len(v) for g, v in sorted(hits.items())}


def confusion_matrix(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """(L, L) counts, rows = reference label, columns = predicted label."""
    index = {label: i for i, label in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for p, r in zip(predictions, references, strict=True):
        m[index[r], index[p]] += 1
    return m


def recall_at_k(similarity: np.ndarray, relevant: Sequence[set[int]], ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """Recall@K of each query row of `similarity` (queries × gallery); `relevant[q]` = correct gallery ids."""
    if similarity.shape[0] != len(relevant):
        raise ValueError(f"{similarity.shape[0]} queries but {len(relevant)} relevance sets")
    order = np.argsort(-similarity, axis=1, kind="stable")
    out = {}
    for k in ks:
        top = order[:, :k]
        out[k] = float(np.mean([bool(relevant[q] & set(top[q].tolist())) for q in range(len(relevant))]))
    return out


def retrieval_recalls(image_emb: np.ndarray, caption_emb: np.ndarray, caption_image: Sequence[int],
                      image_offsets: np.ndarray | None = None) -> dict[str, float]:
    """`t2i_R@K` and `i2t_R@K` for unit-vector embeddings; `caption_image[j]` = image of caption j.
    `image_offsets` (n_images,) are subtracted from every score of their image (a search tower's hubness
    correction): they reorder the images for a caption, never the captions for an image."""
    sim = caption_emb @ image_emb.T  # (captions, images)
    if image_offsets is not None:
        offsets = np.asarray(image_offsets)
        if offsets.shape != (image_emb.shape[0],):
            raise ValueError(f"image_offsets has shape {offsets.shape}, expected ({image_emb.shape[0]},)")
        sim = sim - offsets[None, :]
    t2i = recall_at_k(sim, [{i} for i in caption_image])
    captions_of: list[set[int]] = [set() for _ in range(image_emb.shape[0])]
    for j, i in enumerate(caption_image):
        captions_of[i].add(j)
    i2t = recall_at_k(sim.T, captions_of)
    return {**{f"t2i_R@{k}": v for k, v in t2i.items()}, **{f"i2t_R@{k}": v for k, v in i2t.items()}}


@contextlib.contextmanager
def _java_stderr() -> Iterator[None]:
    """Hold what child processes write to file descriptor 2; show it only when the block fails. The descriptor
    belongs to the whole process, so this is not for code whose other threads write to stderr meanwhile; the
    evaluation CLI has none."""
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """COCO caption metrics (corpus level) of one candidate per item against that item's references."""
    return caption_scores_with_items(candidates, references)[0]


def caption_scores_with_items(
    candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Corpus-level scores and each item's own scores (BLEU per item is sentence-level BLEU).

    CIDEr's document frequencies come from all items' references, so its per-item values depend
    on the whole set, as in the COCO evaluation.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    if not candidates:
        raise ValueError("no captions to score")
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference caption")
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": c if c.strip() else "."}] for i, c in enumerate(candidates)}
    # pycocoevalcap prints progress to stdout, and its Java tokenizer a rate line to the process's stderr:
    # keep stdout clean for --json and stderr for what matters (the Java output comes back with an error)
    with contextlib.redirect_stdout(io.StringIO()), _java_stderr():
        tokenizer = PTBTokenizer()
        gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        bleu, bleu_items = Bleu(4).compute_score(gts_tok, res_tok)
        meteor, meteor_items = Meteor().compute_score(gts_tok, res_tok)
        rouge, rouge_items = Rouge().compute_score(gts_tok, res_tok)
        cider, cider_items = Cider().compute_score(gts_tok, res_tok)
    corpus = {k: float(v) for k, v in zip(CAPTION_KEYS, [*bleu, meteor, rouge, cider], strict=False)}
    items = [
        {k: float(v) for k, v in zip(CAPTION_KEYS, [*(b[i] for b in bleu_items), meteor_items[i], rouge_items[i], cider_items[i]], strict=False)}
        for i in range(len(candidates))
    ]
    return corpus, items


_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, number words as digits, no thousands
    separators ("1,000" = "1000", as the official VQA script)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    text = re.sub(r"[^\w\s]", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def question_type(question: str, answer: str) -> str:
    """A question's type when the file gives none: yes/no, counting, or other."""
    a = normalize_answer(answer)
    if a in ("yes", "no"):
        return "yes/no"
    if a.isdigit() or re.match(r"how many\b", question.strip().lower()):
        return "count"
    return "other"


def vqa_match(prediction: str, reference: str) -> bool:
    """Exact match after normalisation; a yes/no answer also counts when the prediction opens with it."""
    p, r = normalize_answer(prediction), normalize_answer(reference)
    if p == r:
        return True
    return r in ("yes", "no") and p.split()[:1] == [r]


def grounding_hits(predicted: Sequence[Box], reference: Sequence[Box], threshold: float = 0.5) -> int:
    """Reference boxes matched one-to-one (greedily, highest IoU first, as COCO matches) with IoU >= threshold.
    Only the first len(reference) predicted boxes take part, in the model's order, so a model cannot score by
    listing many boxes (for one referred object: its first box)."""
    predicted = predicted[: len(reference)]
    pairs = sorted(
        ((rotated_iou(p, r), i, j) for i, p in enumerate(predicted) for j, r in enumerate(reference)), reverse=True
    )
    used_p: set[int] = set()
    used_r: set[int] = set()
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
    return len(used_r)


def grounding_accuracy(predicted: Sequence[Sequence[Box]], reference: Sequence[Sequence[Box]], threshold: float = 0.5) -> float:
    """acc@threshold over all reference boxes of all items."""
    total = sum(len(r) for r in reference)
    if total == 0:
        return 0.0
    return sum(grounding_hits(p, r, threshold) for p, r in zip(predicted, reference, strict=True)) / total

