"""Evaluation with the field's metrics: scene classification, retrieval, captioning, VQA, grounding.

`annotations` reads the JSONL formats of `../shared/data/README.md`; `metrics` holds the metric
arithmetic (captions through `pycocoevalcap`, the COCO reference implementation); `tasks` drives the
dual encoder or the engine over a file; `report` writes the Markdown report and figures.
"""
