"""QAEdit (Yang et al., ACL 2025, "The Mirage of Model Editing"): real questions from Natural Questions,
TriviaQA and SimpleQA, edited towards their *true* answer (one the model got wrong).

Record -> case: case_id = ``"<source>:<id>"`` (``id`` is unique only within a ``source``), prompt =
``prompt``, subject = ``subject``, target_new = ``target``, no target_true (the model's wrong answer is not
in the file), paraphrases = (``rephrase``,), locality = (QA(``locality[0].loc``, ``locality[0].loc_ans``),)
as the upstream ``edit.py`` uses (``locality="all"`` keeps all five). A subject that occurs more than once in
its question (4 of the 800) is taken at its first whole-word occurrence.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..types import QA, SLOT, EditCase, EditRequest
from . import DatasetError, build, read_records, register_dataset, require, select


def _skip(rec: Any) -> str | None:
    if isinstance(rec, dict) and isinstance(rec.get("target"), str) and not rec["target"].strip():
        return "empty target"
    return None


def subject_template(prompt: str, subject: str) -> str:
    """``prompt`` with one ``{}`` where ``subject`` is: its only occurrence, else its first whole-word one
    (else its first). A subject that does not occur is left to EditRequest, which says so."""
    if prompt.count(subject) <= 1 or not subject:
        return prompt
    m = re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", prompt)
    i = m.start() if m else prompt.index(subject)
    esc = lambda t: t.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return esc(prompt[:i]) + SLOT + esc(prompt[i + len(subject):])


def qaedit_case(rec: dict[str, Any], file: Path, index: int, *, all_locality: bool = False) -> EditCase:
    f = {k: require(rec, k, file, index) for k in ("id", "source", "prompt", "target", "subject", "rephrase")}
    loc = require(rec, "locality", file, index)
    if not isinstance(loc, list) or not loc or not all(isinstance(x, dict) and {"loc", "loc_ans"} <= set(x)
                                                       for x in loc):
        raise DatasetError(f"{file} record {index}: locality must be a non-empty list of {{loc, loc_ans}} objects")
    pairs = tuple(QA(x["loc"], x["loc_ans"]) for x in (loc if all_locality else loc[:1]))

    def make() -> EditCase:
        req = EditRequest(prompt=subject_template(f["prompt"], f["subject"]), subject=f["subject"],
                          target_new=f["target"], case_id=f"{f['source']}:{f['id']}")
        return EditCase(request=req, paraphrases=(f["rephrase"],), locality=pairs, source=f"{file.name}#{index}")

    return build(file, index, make)


def load_qaedit(file: Path, n: int | None = None, offset: int = 0, *, all_locality: bool = False) -> list[EditCase]:
    records = read_records(file)
    cases = [qaedit_case(rec, file, i, all_locality=all_locality)
             for i, rec in select(records, file, n, offset, _skip)]
    seen: dict[Any, int] = {}
    for c in cases:
        if c.case_id in seen:
            raise DatasetError(f"{file}: (source, id) {c.case_id!r} occurs twice ({seen[c.case_id]} and {c.source})")
        seen[c.case_id] = c.source
    return cases


@register_dataset("qaedit", "qaedit/QAEdit_inter_1k_800.json",
                  description="QAEdit (Mirage of Model Editing): 800 real NQ/TriviaQA/SimpleQA questions, true answers")
def _qaedit(file: Path, n: int | None = None, offset: int = 0) -> list[EditCase]:
    return load_qaedit(file, n, offset)


@register_dataset("qaedit-loc5", "qaedit/QAEdit_inter_1k_800.json",
                  description="QAEdit with all five locality questions per record")
def _qaedit_loc5(file: Path, n: int | None = None, offset: int = 0) -> list[EditCase]:
    return load_qaedit(file, n, offset, all_locality=True)
