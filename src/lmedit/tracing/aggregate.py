"""Average indirect effects over known facts (ROME §2.2, Fig. 2) and the layer choice they suggest.

For each fact the model answers correctly, the traced table is reduced to six token categories (first /
middle / last subject token, first subsequent token, further tokens, last token; a category spanning several
tokens is averaged) and the indirect effect IE = p_restored − p_corrupted is averaged over facts (AIE).
ROME's key observation is a peak of the MLP AIE at the *last subject token* in early-middle layers; that
peak is the layer ROME rewrites, and MEMIT spreads its update over the layers around it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..io import atomic_write
from .causal import KINDS, Tracer
from .noise import load_known_facts

log = logging.getLogger(__name__)

CATEGORIES = ("first subject token", "middle subject tokens", "last subject token",
              "first subsequent token", "further tokens", "last token")
LAST_SUBJECT = CATEGORIES.index("last subject token")


def category_rows(n_tokens: int, subject_range: tuple[int, int]) -> list[list[int]]:
    """Token indices of each of the six categories (a category may be empty, e.g. middle of a 2-token subject).

    The last token wins over "first subsequent"/"further" when they coincide, as in ROME's summaries.
    """
    b, e = subject_range
    last = n_tokens - 1
    return [
        [b],
        list(range(b + 1, e - 1)),
        [e - 1],
        [e] if e < last else [],
        list(range(e + 1, last)),
        [last],
    ]


@dataclass
class AverageEffect:
    """Average indirect effect by token category.

    Attributes:
        effects: [6, layers] mean over facts of (score − low_score) per category (NaN where no fact had it).
        scores: [6, layers] mean restored p(answer) per category.
        counts: facts contributing to each category. n_facts: facts traced; n_skipped: facts skipped because
            the clean model's top token was not the known answer. mean_high / mean_low: mean clean and
            corrupted p(answer). fact_ids: known_ids (or indices) of the traced facts.
    """

    kind: str
    window: int
    samples: int
    effects: np.ndarray
    scores: np.ndarray
    counts: list[int]
    n_facts: int
    n_skipped: int
    mean_high: float
    mean_low: float
    fact_ids: list[Any]
    categories: tuple[str, ...] = CATEGORIES

    @property
    def n_layers(self) -> int:
        return int(self.effects.shape[1])

    def peak_layer(self, category: str = "last subject token") -> int:
        """Layer of the largest AIE in one category."""
        return int(np.nanargmax(self.effects[CATEGORIES.index(category)]))

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.json`` (everything, arrays as nested lists)."""
        path = Path(path).with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = asdict(self)
        for k in ("effects", "scores"):
            doc[k] = [[None if np.isnan(v) else float(v) for v in row] for row in getattr(self, k)]
        atomic_write(path, json.dumps(doc, indent=1))  # also a disk cache (suggest_layer): never half written
        return path

    @classmethod
    def load(cls, path: str | Path) -> AverageEffect:
        """Read an average saved by :meth:`save` (the ``.json`` next to ``path``)."""
        doc = json.loads(Path(path).with_suffix(".json").read_text())
        for k in ("effects", "scores"):
            doc[k] = np.array([[np.nan if v is None else v for v in row] for row in doc[k]], dtype=float)
        doc["categories"] = tuple(doc["categories"])
        return cls(**doc)


@torch.no_grad()
def known_correct(handle, facts: Sequence[dict], batch_size: int = 32) -> list[bool]:
    """For each fact: is the clean model's top next token the first token of its ``attribute``?"""
    out: list[bool] = []
    for s in range(0, len(facts), batch_size):
        chunk = facts[s: s + batch_size]
        batch = handle.tokens.prompts([f["prompt"] for f in chunk], side="left")
        logits = handle.logits(batch)[:, -1]  # [batch, vocab] (left padding: last column is every row's end)
        top = logits.argmax(-1).tolist()
        for f, t in zip(chunk, top, strict=True):
            out.append(t == handle.tokens.target_ids(f["prompt"], f["attribute"])[0])
    return out


def select_known(handle, facts: Sequence[dict] | None, n: int) -> tuple[list[dict], int]:
    """The first ``n`` facts the model answers correctly, and how many were skipped before them."""
    facts = list(load_known_facts() if facts is None else facts)
    chosen, skipped = [], 0
    for s in range(0, len(facts), 64):
        chunk = facts[s: s + 64]
        for fact, ok in zip(chunk, known_correct(handle, chunk), strict=True):
            if len(chosen) == n:
                break
            if ok:
                chosen.append(fact)
            else:
                skipped += 1
        if len(chosen) == n:
            break
    if len(chosen) < n:
        log.warning("only %d of the %d requested facts are answered correctly by %s", len(chosen), n, handle.name)
    return chosen, skipped


def average_indirect_effect(handle, facts: Sequence[dict] | None = None, kind: str = "mlp", n: int = 50, *,
                            samples: int = 10, noise: float | str | None = None, window: int = 10,
                            token_range: str | None = None, max_rows: int = 256,
                            progress: bool = False) -> AverageEffect:
    """AIE by token category over the first ``n`` known facts the model gets right (spec C.7).

    Args:
        facts: dicts with ``prompt, subject, attribute`` (default: known_1000). Facts whose first answer token
            is not the model's top prediction are skipped and counted (``n_skipped``).
        token_range: None traces every token; ``"subject_last"`` only the last subject token (fast).
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: use one of {KINDS}")
    chosen, skipped = select_known(handle, facts, n)
    if not chosen:
        raise ValueError(f"{handle.name} answers none of the given facts correctly; nothing to average")
    from tqdm.auto import tqdm

    n_layers = handle.n_layers
    sums = np.zeros((2, len(CATEGORIES), n_layers))  # [effect|score, category, layer]
    counts = np.zeros(len(CATEGORIES), dtype=int)
    highs, lows, ids = [], [], []
    for i, fact in enumerate(tqdm(chosen, desc=f"facts ({kind})", disable=not progress)):
        tracer = Tracer(handle, fact["prompt"], fact["subject"], samples=samples, noise=noise,
                        answer=fact["attribute"])
        res = tracer.trace(kind, window=window, token_range=token_range, max_rows=max_rows)
        for c, rows in enumerate(category_rows(len(res.tokens), res.subject_range)):
            traced = [r for r in rows if not np.isnan(res.scores[r]).any()]
            if traced:
                score = res.scores[traced].mean(0)  # [layers]
                sums[:, c] += (score - res.low_score, score)
                counts[c] += 1
        highs.append(res.high_score)
        lows.append(res.low_score)
        ids.append(fact.get("known_id", i))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / np.where(counts > 0, counts, np.nan)[None, :, None]
    return AverageEffect(kind=kind, window=1 if kind == "hidden" else window, samples=samples,
                         effects=mean[0], scores=mean[1], counts=counts.tolist(), n_facts=len(chosen),
                         n_skipped=skipped, mean_high=float(np.mean(highs)), mean_low=float(np.mean(lows)),
                         fact_ids=ids)


class LayerSuggestion(NamedTuple):
    """``layer``: the layer of peak AIE at the last subject token; ``evidence``: the averaged traces."""

    layer: int
    evidence: AverageEffect

    def ranked(self) -> list[int]:
        """Layers by AIE at the last subject token, largest first."""
        row = np.nan_to_num(self.evidence.effects[LAST_SUBJECT], nan=-np.inf)
        return [int(i) for i in np.argsort(-row, kind="stable")]

    def span(self, k: int) -> list[int]:
        """The ``k`` consecutive layers with the largest summed AIE at the last subject token (MEMIT's range)."""
        row = np.nan_to_num(self.evidence.effects[LAST_SUBJECT], nan=0.0)
        if not 1 <= k <= len(row):
            raise ValueError(f"span of {k} layers: choose 1..{len(row)}")
        sums = np.convolve(row, np.ones(k), mode="valid")  # [layers - k + 1]
        start = int(np.argmax(sums))
        return list(range(start, start + k))


def suggest_layers(handle, n_facts: int = 20, kind: str = "mlp", *, facts: Sequence[dict] | None = None,
                   samples: int = 10, noise: float | str | None = None, window: int = 10,
                   progress: bool = False) -> LayerSuggestion:
    """The layer where restoring ``kind`` at the last subject token helps most (ROME's edit layer).

    Only the last-subject-token row is traced, so this costs ``n_facts × layers × samples`` rows. The answer
    is cached on the handle and on disk (``$LMEDIT_HOME/tracing``) by model fingerprint and arguments.
    """
    key = ("tracing.suggest", kind, n_facts, samples, str(noise), window, facts is None)
    if key in handle.cache:
        return handle.cache[key]
    from ..io import cache_key, cache_path, lmedit_home

    folder = lmedit_home() / "tracing"
    params = {"kind": kind, "facts": n_facts, "samples": samples, "window": window, "noise": noise or "s3"}
    disk = cache_path(folder, cache_key("suggest", handle.fingerprint, params, show=("kind", "facts")), ".json",
                      legacy=folder / f"suggest-{handle.fingerprint}-{kind}-n{n_facts}-s{samples}-w{window}-"
                                      f"{noise or 's3'}.json")
    if facts is None and disk.exists():
        avg = AverageEffect.load(disk)
    else:
        avg = average_indirect_effect(handle, facts, kind, n_facts, samples=samples, noise=noise, window=window,
                                      token_range="subject_last", progress=progress)
        if facts is None:
            avg.save(disk)
    result = LayerSuggestion(avg.peak_layer("last subject token"), avg)
    log.info("%s: peak %s AIE at the last subject token is layer %d (%d facts)",
             handle.name, kind, result.layer, avg.n_facts)
    handle.cache[key] = result
    return result
