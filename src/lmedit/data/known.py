"""ROME's known facts (``known_1000.json``): prompts the model completes correctly, for causal tracing."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from . import DatasetError, read_records, register_dataset, require, select


class KnownFact(NamedTuple):
    """A prompt holding ``subject`` and the attribute the model is expected to continue it with."""

    prompt: str
    subject: str
    attribute: str


@register_dataset("known", "misc/known_1000.json", kind="known", benchmark=False,
                  description="ROME known facts (1,209): prompt, subject, attribute for causal tracing")
def load_known_file(file: Path, n: int | None = None, offset: int = 0) -> list[KnownFact]:
    out = []
    for i, rec in select(read_records(file), file, n, offset, lambda r: None):
        fact = KnownFact(*(require(rec, k, file, i, str) for k in ("prompt", "subject", "attribute")))
        if fact.subject not in fact.prompt:
            raise DatasetError(f"{file} record {i}: subject {fact.subject!r} does not occur in prompt {fact.prompt!r}")
        out.append(fact)
    return out
