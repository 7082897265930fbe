"""Retrieval: documentation passages and archive images from a chromadb store, for RAG and search.

    store.py      where the collections live (local directory or chroma server) and how a broken
                  store is recognised
    text.py       MiniLM text embeddings (llama-index HuggingFaceEmbedding over the shipped model)
    docs.py       Markdown → heading-aware chunks → docs collection, incrementally
    embedders.py  image embedders (the ImageNet stem, a trained dual-encoder tower with its query bank)
    images.py     image archive → image embeddings (+ caption embeddings), incrementally
    retriever.py  `Retriever`: what the engine and `geochat search` call
"""

from geochat.retrieval.docs import BUNDLED_KNOWLEDGE, IndexReport, index_docs
from geochat.retrieval.embedders import image_embedder_from_name
from geochat.retrieval.images import index_images
from geochat.retrieval.retriever import ImageHit, Retriever, ensure_retriever
from geochat.retrieval.store import CorruptIndexError, IndexStore, MixedEmbedderError, StoreLocation, wipe_store

__all__ = [
    "BUNDLED_KNOWLEDGE",
    "CorruptIndexError",
    "ImageHit",
    "IndexReport",
    "IndexStore",
    "MixedEmbedderError",
    "Retriever",
    "StoreLocation",
    "ensure_retriever",
    "image_embedder_from_name",
    "index_docs",
    "index_images",
    "wipe_store",
]
