"""ZsRE in its MEND/ROME form (question answering edits), as EasyEdit maps it (methods-spec A.6).

Record -> case: prompt = ``src``, subject = ``subject``, target_new = ``alt``, target_true = ``answers[0]``,
paraphrases = (``rephrase``,), locality = (QA(``loc``, ``loc_ans``),). ``loc`` keeps its ``"nq question: "``
prefix, as ROME and EasyEdit do. The portability file adds one group ``one_hop`` from
``portability["New Question"]`` -> ``portability["New Answer"]``. Records with an empty ``alt`` are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..types import QA, EditCase, EditRequest
from . import build, read_records, register_dataset, require, select


def _skip(rec: Any) -> str | None:
    if isinstance(rec, dict) and isinstance(rec.get("alt"), str) and not rec["alt"].strip():
        return "empty alt"
    return None


def zsre_case(rec: dict[str, Any], file: Path, index: int, *, portability: bool = False) -> EditCase:
    """One ZsRE record as an EditCase (case_id = the record's index in the file)."""
    answers = require(rec, "answers", file, index, (str, list))
    if isinstance(answers, str):
        answers = [answers]
    fields = {k: require(rec, k, file, index, str) for k in ("src", "subject", "alt", "rephrase", "loc", "loc_ans")}
    groups: dict[str, tuple[QA, ...]] = {}
    if portability:
        q = require(rec, "portability.New Question", file, index, str)
        a = require(rec, "portability.New Answer", file, index, str)
        groups["one_hop"] = (QA(q, a),)

    def make() -> EditCase:
        req = EditRequest(prompt=fields["src"], subject=fields["subject"], target_new=fields["alt"],
                          target_true=answers[0] if answers else None, case_id=index)
        return EditCase(request=req, paraphrases=(fields["rephrase"],),
                        locality=(QA(fields["loc"], fields["loc_ans"]),), portability=groups,
                        source=f"{file.name}#{index}")

    return build(file, index, make)


def load_zsre(file: Path, n: int | None = None, offset: int = 0, *, portability: bool = False) -> list[EditCase]:
    records = read_records(file)
    return [zsre_case(rec, file, i, portability=portability) for i, rec in select(records, file, n, offset, _skip)]


@register_dataset("zsre", "zsre/zsre_mend_eval_1000.json",
                  description="ZsRE MEND eval split (first 1,000 records): question-answer edits")
def _zsre(file: Path, n: int | None = None, offset: int = 0) -> list[EditCase]:
    return load_zsre(file, n, offset)


@register_dataset("zsre-train", "zsre/zsre_mend_train_1k.json",
                  description="ZsRE MEND train split, 1k subset (for trained editors)")
def _zsre_train(file: Path, n: int | None = None, offset: int = 0) -> list[EditCase]:
    return load_zsre(file, n, offset)


@register_dataset("zsre-portability", "portability/zsre_mend_eval_portability_gpt4_800.json",
                  description="EasyEdit ZsRE portability set (800): adds one-hop questions")
def _zsre_portability(file: Path, n: int | None = None, offset: int = 0) -> list[EditCase]:
    return load_zsre(file, n, offset, portability=True)
