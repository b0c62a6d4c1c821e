"""Noise scale for causal tracing: the "3σ" rule of ROME (Meng et al., 2022, §2.1).

The subject's token embeddings are corrupted by adding ν·ε, ε ~ N(0, I). ROME sets ν = 3σ, where σ is the
standard deviation of the embedding outputs over all subject tokens of its known-facts set
(``known_1000.json``): large enough to destroy the subject's identity, on the scale the model is used to.
σ is computed once per model and cached on the handle and on disk, keyed by the model fingerprint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..hooks import get_module
from ..io import atomic_write, cache_key, cache_path, lmedit_home

log = logging.getLogger(__name__)

DEFAULT_FACTOR = 3.0
KNOWN_FILE = "misc/known_1000.json"  # recorded with the cached std


def load_known_facts(path: str | Path | None = None) -> list[dict[str, Any]]:
    """ROME's known facts (``known_1000.json``) as dicts with ``prompt, subject, attribute``.

    Read through ``lmedit.data.load_known``, which searches ``$LMEDIT_DATA`` and the shared data folder.
    """
    from ..data import load_known

    return [_as_fact(r) for r in load_known(path=path)]


def _as_fact(record: Any) -> dict[str, Any]:
    """A known-fact record (dict or dataclass-like) as a plain dict with the fields tracing reads."""
    if isinstance(record, dict):
        out = dict(record)
    elif hasattr(record, "_asdict"):
        out = record._asdict()
    else:
        out = {k: getattr(record, k) for k in ("known_id", "subject", "attribute", "prompt") if hasattr(record, k)}
    missing = [k for k in ("subject", "attribute", "prompt") if k not in out]
    if missing:
        raise ValueError(f"known-fact record lacks {missing}: {record!r}")
    return out


@torch.no_grad()
def embedding_std(handle, subjects: Sequence[str]) -> float:
    """σ: the std of the embedding-module outputs over every token of every subject string."""
    if not subjects:
        raise ValueError("embedding_std needs at least one subject string")
    ids = [i for s in subjects for i in handle.tokens.encode(s)]
    embed = get_module(handle.model, handle.adapter.embed)
    x = embed(torch.tensor(ids, device=handle.device))  # [n_tokens, d]
    return float(x.double().std())


def _disk_path(handle) -> Path:
    folder = lmedit_home() / "tracing"
    return cache_path(folder, cache_key("embedding-std", handle.fingerprint, {"subjects": KNOWN_FILE}), ".json",
                      legacy=folder / f"embedding-std-{handle.fingerprint}.json")


def subject_std(handle) -> float:
    """σ over the subjects of known_1000, cached on the handle and under ``$LMEDIT_HOME/tracing``."""
    key = "tracing.subject_std"
    if key in handle.cache:
        return handle.cache[key]
    path = _disk_path(handle)
    if path.exists():
        sigma = float(json.loads(path.read_text())["std"])
    else:
        subjects = sorted({f["subject"] for f in load_known_facts()})
        sigma = embedding_std(handle, subjects)
        atomic_write(path, json.dumps({"std": sigma, "n_subjects": len(subjects), "source": KNOWN_FILE,
                                       "fingerprint": handle.fingerprint}))
        log.info("subject embedding std of %s: %.5f over %d subjects (cached at %s)",
                 handle.name, sigma, len(subjects), path)
    handle.cache[key] = sigma
    return sigma


def resolve_noise(handle, noise: float | str | None) -> float:
    """The absolute noise scale ν.

    Args:
        noise: ``None`` -> 3σ (ROME's rule); ``"s<k>"`` (e.g. ``"s3"``) -> k·σ; a number -> ν itself.
    """
    if noise is None:
        return DEFAULT_FACTOR * subject_std(handle)
    if isinstance(noise, str):
        text = noise.strip().lower()
        if text.startswith("s"):
            try:
                factor = float(text[1:])
            except ValueError:
                raise ValueError(f"noise {noise!r}: write s<k> (k times the subject embedding std), e.g. s3") from None
            return factor * subject_std(handle)
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"noise {noise!r}: give a number, or s<k> for k times the subject std") from None
    value = float(noise)
    if value < 0:
        raise ValueError(f"noise scale must be >= 0, got {value}")
    return value
