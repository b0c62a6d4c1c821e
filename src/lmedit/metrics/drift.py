"""Capability drift: the edited model's general ability, measured before and after edits.

- **Perplexity** on a fixed slice of WikiText-2 (the first ``tokens`` tokens of the test split, 20,000 by
  default, with the tokenized release's ``@-@`` / ``@,@`` / ``@.@`` markers undone), in windows of ``window``
  tokens; every token but the first of a window is predicted. Tag ``perplexity``.
- **N-gram entropy** of greedy generations on fixed prompts (ROME's fluency measure: the weighted mean of
  the 2-gram and 3-gram entropies of each text, weights 2/3 and 4/3, averaged over texts; a model that
  repeats itself scores low). Tag ``ngram_entropy``.

:class:`DriftTracker` measures the unedited model once ("before") and the edited model after chosen chunks
of a batch or sequential run, and appends each measurement to ``drift.jsonl`` in the run folder (a resumed
run does not measure a point again). In-context edits apply to the generations, not to the perplexity text.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..io import append_jsonl, read_jsonl
from ..kv import body_and_head
from .generate import frame, generate_texts
from .records import Score

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

PERPLEXITY, NGRAM_ENTROPY = "perplexity", "ngram_entropy"  # the tags (and names) of the two numbers
DRIFT_FILE = "drift.jsonl"
WIKITEXT = "corpus/wikitext-2_test.tokens.txt"
WIKITEXT_VALID = "corpus/wikitext-2_valid.tokens.txt"  # no drift number reads it: free for calibration
DRIFT_PROMPTS = (
    "The history of the city begins", "My favourite recipe for dinner is", "The main causes of the war were",
    "In the morning, the scientists", "The best way to learn a new language is", "The river flows through",
    "Her first novel was about", "The football match ended", "Computers are useful because",
    "During the summer holidays we",
)
_MARKERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


@dataclass(frozen=True)
class DriftSettings:
    """What drift measures. ``every``: batch runs measure after chunk 0 (0) or every ``every``-th chunk;
    sequential runs after the last chunk (0) and also after every ``every``-th chunk (the checkpoints)."""

    tokens: int = 20_000
    window: int = 512
    every: int = 0
    prompts: tuple[str, ...] = DRIFT_PROMPTS
    max_new_tokens: int = 48
    corpus: str | None = None  # a text file instead of the shared WikiText-2 test split

    def __post_init__(self) -> None:
        if self.tokens < 2 or self.window < 2 or self.every < 0 or self.max_new_tokens < 1 or not self.prompts:
            raise ValueError("drift needs tokens and window of at least 2, every >= 0, max_new_tokens >= 1 and "
                             "at least one prompt")


def corpus_ids(handle: ModelHandle, settings: DriftSettings) -> list[int]:
    """The first ``settings.tokens`` token ids of the drift corpus (cached on the handle)."""
    return text_ids(handle, WIKITEXT, settings.tokens, settings.corpus)


def text_ids(handle: ModelHandle, relative: str, tokens: int, path: str | None = None) -> list[int]:
    """The first ``tokens`` token ids of a data file (``relative`` to a data root, e.g. :data:`WIKITEXT`, found
    as every data file is) or of the text file ``path``, WikiText's markers undone; cached on the handle."""
    from ..data.paths import find_data_file

    found = find_data_file(relative, path)
    key = ("text_ids", str(found), tokens)
    if key not in handle.cache:
        text = Path(found).read_text(encoding="utf-8")
        for a, b in _MARKERS:
            text = text.replace(a, b)
        n_chars = tokens * 6
        while True:
            ids = handle.tokens.encode(text[:n_chars])
            if len(ids) > tokens or n_chars >= len(text):
                break
            n_chars *= 2
        if len(ids) < tokens:
            raise ValueError(f"{found} has only {len(ids)} tokens; ask for at most that many")
        handle.cache[key] = ids[:tokens]
    return handle.cache[key]


@torch.no_grad()
def perplexity(handle: ModelHandle, ids: list[int], window: int = 512, slice_len: int = 128) -> float:
    """exp(mean NLL) of ``ids`` read in windows of ``window`` tokens (each window starts with the model's
    BOS where it uses one). The unembedding runs on ``slice_len`` positions at a time."""
    total, count = 0.0, 0
    body_head = body_and_head(handle.model)
    for s in range(0, len(ids), window):
        row = handle.tokens.bos + ids[s:s + window]
        if len(row) < 2:
            continue
        x = torch.tensor([row], device=handle.device)
        labels = x[0, 1:]
        if body_head is None:
            logits = handle.model(input_ids=x).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
        else:
            body, head = body_head
            hidden = body(input_ids=x).last_hidden_state[0, :-1]
            for j in range(0, hidden.shape[0], slice_len):
                logits = head(hidden[j:j + slice_len]).float()
                total += float(F.cross_entropy(logits, labels[j:j + slice_len], reduction="sum"))
        count += len(row) - 1
    return math.exp(total / count)


def ngram_entropy(texts: list[str], ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's n-gram entropy (see the module docstring); words are runs of letters/digits or single marks."""
    per_text = []
    for text in texts:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        ents = []
        for n, w in zip(ns, weights, strict=True):
            grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            total = sum(grams.values())
            ents.append(w * (-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0))
        per_text.append(sum(ents) / len(ents))
    return sum(per_text) / len(per_text)


def measure_drift(handle: ModelHandle, settings: DriftSettings) -> dict[str, Any]:
    """Both numbers on the model as it is now, with the generations they were computed from."""
    t0 = time.perf_counter()
    ppl = perplexity(handle, corpus_ids(handle, settings), settings.window)
    framed = [frame(handle, p, "question") for p in settings.prompts]
    gens = generate_texts(handle, framed, max_new_tokens=settings.max_new_tokens, stop_at_newline=False)
    texts = [g.text for g in gens]
    return {"scores": {PERPLEXITY: Score(ppl, PERPLEXITY, settings.tokens).to_dict(),
                       NGRAM_ENTROPY: Score(ngram_entropy(texts), NGRAM_ENTROPY, len(texts)).to_dict()},
            "texts": texts, "seconds": time.perf_counter() - t0}


class DriftTracker:
    """Drift of one run: before any edit, then after the chunks that are due (see :class:`DriftSettings`)."""

    def __init__(self, handle: ModelHandle, settings: DriftSettings, out: Path | None, *, n_chunks: int,
                 setting: str) -> None:
        self.handle, self.settings, self.n_chunks, self.setting = handle, settings, n_chunks, setting
        self.path = out / DRIFT_FILE if out is not None else None
        self.records: list[dict[str, Any]] = read_jsonl(self.path)

    def _has(self, point: str) -> bool:
        return any(r["point"] == point for r in self.records)

    def _measure(self, point: str, **extra: Any) -> None:
        if self._has(point):
            return
        log.info("capability drift: measuring %s", point)
        rec = {"point": point, **extra, **measure_drift(self.handle, self.settings)}
        self.records.append(rec)
        append_jsonl(self.path, [rec])

    def before(self) -> None:
        self._measure("before", edits_applied=0)

    def due(self, k: int) -> bool:
        every = self.settings.every
        if self.setting == "sequential":
            return k == self.n_chunks - 1 or (every > 0 and (k + 1) % every == 0)
        return k == 0 if every == 0 else k % every == 0

    def after_chunk(self, k: int, edits_applied: int) -> None:
        """Call with the model holding chunk ``k``'s edit (and, sequential, every earlier one):
        ``edits_applied`` requests in all."""
        if self.due(k):
            self._measure(f"after chunk {k}", chunk=k, edits_applied=edits_applied)

    def checkpoint(self, k: int, edits_applied: int) -> None:
        """Measure after chunk ``k`` whatever the schedule says (a lifelong run's checkpoint)."""
        self._measure(f"after chunk {k}", chunk=k, edits_applied=edits_applied)

    def summary(self) -> dict[str, Any]:
        """Each point's two numbers (with their tags) and the last point's change from before."""
        points = [{"point": r["point"], "edits_applied": r.get("edits_applied"), **r["scores"]} for r in self.records]
        out: dict[str, Any] = {"points": points, "settings": {"tokens": self.settings.tokens,
                                                             "window": self.settings.window,
                                                             "prompts": len(self.settings.prompts)}}
        before = next((p for p in points if p["point"] == "before"), None)
        after = [p for p in points if p["point"] != "before"]
        if before and after:
            out["change"] = {m: {"before": before[m]["value"], "after": after[-1][m]["value"],
                                 "protocol": before[m]["protocol"]} for m in (PERPLEXITY, NGRAM_ENTROPY)}
        return out


def drift_lines(drift: dict[str, Any]) -> list[str]:
    """A markdown table of a run summary's drift points."""
    lines = [f"Capability drift (perplexity on {drift['settings']['tokens']:,} WikiText-2 tokens; n-gram entropy "
             f"of generations on {drift['settings']['prompts']} fixed prompts):", "",
             "| point | edits applied | perplexity | n-gram entropy |", "|---|---:|---:|---:|"]
    for p in drift["points"]:
        lines.append(f"| {p['point']} | {p.get('edits_applied', '')} | {p[PERPLEXITY]['value']:.2f} | "
                     f"{p[NGRAM_ENTROPY]['value']:.3f} |")
    return lines
