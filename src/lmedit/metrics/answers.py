"""Free-text answers: where a generated answer ends, how it is normalised, and how it is compared.

Normalisation (SQuAD's, as used by EasyEdit's and QAEdit's exact-match fallback): lowercase, drop punctuation,
drop the articles *a*, *an*, *the*, collapse whitespace. On top of it:

- :func:`exact_match`: the normalised answer equals the normalised gold;
- :func:`token_f1`: the harmonic mean of precision and recall of the normalised tokens (a bag, as SQuAD);
- :func:`contains`: the normalised gold occurs in the normalised answer as a run of whole tokens (lenient;
  Pohl et al. 2025 warn that it gives false positives, which is why it is reported beside the others).

A gold answer that normalises to nothing (``""``, ``"The"``, ``"?!"``) cannot be scored: the functions raise
:class:`EmptyGoldError` instead of returning a number.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")
# a label the model puts before its answer ("A: Paris", "Answer: Paris") is not part of the answer
ANSWER_LABEL = re.compile(r"^\s*(?:answer|a)\s*:\s*", re.IGNORECASE)


class EmptyGoldError(ValueError):
    """A gold answer with no words left after normalisation; it cannot score an answer."""


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """Lowercase, punctuation and articles removed, whitespace collapsed: ``"The  U.S.A.!"`` -> ``"usa"``."""
    text = "".join(ch for ch in text.lower() if not _is_punct(ch))
    return " ".join(ARTICLES.sub(" ", text).split())


def extract_answer(generated: str) -> str:
    """The answer in a generated continuation: leading whitespace and newlines skipped, then the text up to
    the first line break, without a leading ``A:`` / ``Answer:`` label."""
    first = generated.lstrip().split("\n", 1)[0]
    return ANSWER_LABEL.sub("", first).strip()


def _gold_tokens(gold: str) -> list[str]:
    tokens = normalize(gold).split()
    if not tokens:
        raise EmptyGoldError(f"gold answer {gold!r} is empty after normalisation; it cannot score an answer")
    return tokens


def exact_match(answer: str, gold: str) -> float:
    """1.0 when the normalised answer equals the normalised gold, else 0.0."""
    return float(normalize(answer).split() == _gold_tokens(gold))


def token_f1(answer: str, gold: str) -> float:
    """Token F1 of the normalised answer against the normalised gold (0.0 for an empty answer)."""
    return overlap_f1(normalize(answer).split(), _gold_tokens(gold))


def overlap_f1(pred: list[str], ref: list[str]) -> float:
    """Token F1 of two token lists (both empty: 1.0, they agree; one empty: 0.0)."""
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(answer: str, gold: str) -> float:
    """1.0 when the normalised gold occurs in the normalised answer as whole tokens, else 0.0."""
    g = " ".join(_gold_tokens(gold))
    return float(f" {g} " in f" {normalize(answer)} ")


def agree(a: str, b: str) -> tuple[float, float]:
    """(exact agreement, token F1) of two answers of the same question, e.g. before and after an edit; two
    empty answers agree."""
    x, y = normalize(a).split(), normalize(b).split()
    return float(x == y), overlap_f1(x, y)
