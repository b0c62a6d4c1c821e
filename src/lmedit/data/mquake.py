"""MQuAKE multi-hop cases: several edits whose combination changes the answer of a multi-hop question.

After all of a case's ``requests`` are applied, the answer to any of its ``questions`` should be
``new_answer`` (or one of ``new_answer_alias``); before, it was ``answer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..types import EditRequest
from . import DatasetError, build, read_records, register_dataset, require, select


@dataclass(frozen=True)
class MultiHopCase:
    """One MQuAKE record: the edits to apply together and the multi-hop questions they change."""

    scorer: ClassVar[str] = "multihop"  # how the benchmark scores it (lmedit.metrics.multihop)

    requests: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    new_answer: str
    new_answer_alias: tuple[str, ...]
    answer: str
    case_id: int | str | None = None
    answer_alias: tuple[str, ...] = ()
    source: str = ""


def mquake_case(rec: dict[str, Any], file: Path, index: int) -> MultiHopCase:
    case_id = rec.get("case_id", index)
    rewrites = require(rec, "requested_rewrite", file, index)
    if not isinstance(rewrites, list) or not rewrites:
        raise DatasetError(f"{file} record {index}: requested_rewrite must be a non-empty list")
    parts = []
    for rw in rewrites:
        parts.append({k: require(rw, k, file, index, str) for k in ("prompt", "subject")}
                     | {"new": require(rw, "target_new.str", file, index, str),
                        "true": require(rw, "target_true.str", file, index, str)})
    questions = tuple(require(rec, "questions", file, index, list))
    fields = {k: require(rec, k, file, index, str) for k in ("new_answer", "answer")}

    def make() -> MultiHopCase:
        reqs = tuple(EditRequest(prompt=p["prompt"], subject=p["subject"], target_new=p["new"], target_true=p["true"],
                                 case_id=f"{case_id}.{j}") for j, p in enumerate(parts))
        return MultiHopCase(requests=reqs, questions=questions, new_answer=fields["new_answer"],
                            new_answer_alias=tuple(rec.get("new_answer_alias", ())), answer=fields["answer"],
                            case_id=case_id, answer_alias=tuple(rec.get("answer_alias", ())),
                            source=f"{file.name}#{index}")

    return build(file, index, make)


@register_dataset("mquake", "portability/MQuAKE-hard_300.json", kind="multihop", requests_per_case=4,
                  description="MQuAKE-CF hard subset (300 cases, 4 edits each): multi-hop questions")
def load_mquake_file(file: Path, n: int | None = None, offset: int = 0) -> list[MultiHopCase]:
    records = read_records(file)
    return [mquake_case(rec, file, i) for i, rec in select(records, file, n, offset, lambda r: None)]
