"""Which scoring protocols a finished case holds, and what a resumed run does about the ones it lacks.

A run resumed with protocols its finished cases were not scored with (a run from before the generation
protocol, resumed by a version that computes it by default) either computes the missing protocols for those
cases (``fill_missing``: the case is edited and scored again, and its new numbers are merged under the old
ones, which are kept as they were) or marks them: ``info["missing_protocols"]`` lists what the case lacks,
and the summary counts them. A missing protocol is never a zero.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write
from .records import CaseResult

log = logging.getLogger(__name__)

MISSING = "missing_protocols"


def held(res: CaseResult, run_protocols: Sequence[str] | None) -> set[str]:
    """The protocols ``res`` was scored with: its own record, else the run's (``run.json``), else the
    teacher-forced pair every run computed before records kept it."""
    from .evaluate import TEACHER_FORCED

    if res.protocols is not None:
        return set(res.protocols)
    return set(run_protocols if run_protocols is not None else TEACHER_FORCED)


def lacking(res: CaseResult, wanted: Sequence[str], run_protocols: Sequence[str] | None) -> list[str]:
    """The wanted protocols that ``res`` was not scored with (a failed edit has nothing to lack)."""
    if "error" in res.info:
        return []
    have = held(res, run_protocols)
    return [p for p in wanted if p not in have]


def tolerated_differences(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, ...]:
    """run.json fields in which a resumed run may differ from the one on disk: the protocols (the missing
    ones are topped up), and the generation settings when the old run did not generate."""
    return ("protocols",) + (("generation",) if "generation" not in old else ())


def reopen(done: dict[Any, CaseResult], wanted: Sequence[str], run_protocols: Sequence[str] | None, *,
           fill: bool) -> dict[Any, CaseResult]:
    """Finished cases that lack a wanted protocol. With ``fill`` they leave ``done`` (to be computed again)
    and are returned; otherwise they stay, marked with what they lack, and nothing is returned."""
    out: dict[Any, CaseResult] = {}
    for key, res in list(done.items()):
        missing = lacking(res, wanted, run_protocols)
        if not missing:
            continue
        if fill:
            out[key] = done.pop(key)
            out[key].info[MISSING] = missing
        else:
            res.info[MISSING] = missing
    if out:
        log.info("%d finished case(s) lack protocol(s) %s: computing them", len(out),
                 sorted({p for r in out.values() for p in r.info[MISSING]}))
    elif not fill and any(MISSING in r.info for r in done.values()):
        log.warning("some finished cases lack protocols %s; they are marked as missing",
                    sorted({p for r in done.values() for p in r.info.get(MISSING, [])}))
    return out


def merge(old: CaseResult, new: CaseResult) -> CaseResult:
    """``new`` (the case computed again with every protocol) under ``old``: what ``old`` had stays as it was."""
    info = {**new.info, **{k: v for k, v in old.info.items() if k != MISSING}, "protocols_added": old.info[MISSING]}
    protocols = sorted(set(new.protocols or []) | set(old.protocols or []))
    return CaseResult(old.case_id, post={**new.post, **old.post}, pre={**new.pre, **old.pre},
                      efficiency=old.efficiency or new.efficiency, info=info, texts=new.texts or old.texts,
                      protocols=protocols)


def missing_counts(results: Sequence[CaseResult]) -> dict[str, int]:
    """Protocol -> number of cases marked as lacking it."""
    counts: dict[str, int] = {}
    for r in results:
        for p in r.info.get(MISSING, []):
            counts[p] = counts.get(p, 0) + 1
    return counts


def drop_cases(path: Path, keys: set[str]) -> None:
    """Rewrite the cases file ``path`` without the lines of cases ``keys`` (by str(case_id)): reopened cases
    are written again when they finish (their old numbers are merged in from memory)."""
    if not keys or not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if str(json.loads(line)["case_id"]) in keys:
                continue
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
        keep.append(line)
    atomic_write(path, "".join(line + "\n" for line in keep))


def stamp(line: str, res: CaseResult, run_protocols: Sequence[str] | None) -> str:
    """A cases.jsonl ``line`` that records the protocols it holds (lent to another run, whose run.json
    would otherwise speak for it)."""
    if res.protocols is not None:
        return line
    return json.dumps({**json.loads(line), "protocols": sorted(held(res, run_protocols))}, default=str)
