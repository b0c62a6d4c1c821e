"""Multi-hop accuracy on MQuAKE: apply all of a case's edits, then ask its multi-hop questions.

Protocol (tag ``greedy_exact``). A case has k edits (4 in MQuAKE-hard), 3 paraphrased multi-hop questions
and a new answer with aliases. The edits are applied together: as one ``compute`` over all k requests when
the editor batches, otherwise one by one, each computed on the model that already holds the previous ones
(the sequential setting). Then for every question q and every answer string a in {new_answer} ∪ aliases:

    answered(q, a) = 1{ for every answer token j: argmax_v p(v | q ␣ a_<j) = a_j }

i.e. teacher-forced token accuracy of a after q (joined by one space, as for ZsRE) is exactly 1. By
induction over j this is the same as "the greedy continuation of q begins with a's tokens", computed in one
batched forward instead of a generation loop. The case scores

    multihop = max_{q, a} answered(q, a)            (MQuAKE: any question answered with any alias)
    multihop_token_acc = max_{q, a} token_acc(q, a)  (a softer view, tag ``token_acc_max``)

The questions are asked as written (no few-shot or chain-of-thought prompt), so small models score near
zero before and after editing; ``pre`` holds the unedited model's scores for comparison.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bench.rundir import read_cases
from ..io import atomic_write
from ..metrics.records import CaseResult, Score
from ..metrics.scoring import score_targets

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

GREEDY_EXACT = "greedy_exact"  # the greedy continuation starts with the answer (checked by teacher forcing)
TOKEN_ACC_MAX = "token_acc_max"  # best teacher-forced token accuracy over questions x aliases
CASES_FILE = "cases.jsonl"


class CannotStackEdits(RuntimeError):
    """The editor neither batches nor stacks edits, so a multi-edit case cannot be applied."""


def _answers(case: Any) -> list[str]:
    return list(dict.fromkeys(a for a in (case.new_answer, *case.new_answer_alias) if a and a.strip()))


def score_multihop(handle: ModelHandle, case: Any, batch_size: int = 32) -> dict[str, Score]:
    """Score one case's questions against its new answers on the model as it is now."""
    pairs = [(q, a) for q in case.questions for a in _answers(case)]
    if not pairs:
        return {}
    scores = score_targets(handle, [q for q, _ in pairs], [a for _, a in pairs], batch_size)
    best_exact = max(float(s.accuracy == 1.0) for s in scores)
    best_acc = max(s.accuracy for s in scores)
    return {"multihop": Score(best_exact, GREEDY_EXACT, len(pairs)),
            "multihop_token_acc": Score(best_acc, TOKEN_ACC_MAX, len(pairs))}


def apply_all(editor: Any, handle: ModelHandle, requests: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Apply ``requests`` together (one batch, or stacked one by one).

    Returns the applied edits and the efficiency record of their computation (``seconds`` per request,
    ``case_seconds``, peak memory), measured as run_benchmark measures it. On any error the edits applied
    so far are reverted, so the model is left as it was.
    """
    from ..metrics.efficiency import measure

    caps = editor.capabilities
    if not caps.batch and not caps.sequential:
        raise CannotStackEdits(f"{editor.name} edits one request at a time and cannot stack edits, so the "
                               f"{len(requests)} edits of a multi-hop case cannot be applied together")
    groups = [requests] if caps.batch else [[r] for r in requests]
    applied: list[Any] = []
    seconds, rss, cuda = 0.0, [], []
    try:
        for group in groups:
            with measure() as m:
                edit = editor.compute(handle, group)
            seconds += m.seconds
            rss += [m.peak_rss_bytes] if m.peak_rss_bytes is not None else []
            cuda += [m.cuda_peak_bytes] if m.cuda_peak_bytes is not None else []
            applied.append(edit.apply(handle))
    except BaseException:
        revert_all(handle, applied)
        raise
    eff: dict[str, Any] = {"seconds": seconds / len(requests), "case_seconds": seconds, "edits": len(requests)}
    if rss:
        eff["peak_rss_bytes"] = max(rss)
    if cuda:
        eff["cuda_peak_bytes"] = max(cuda)
    return applied, eff


def revert_all(handle: ModelHandle, edits: list[Any]) -> None:
    for edit in reversed(edits):
        edit.revert(handle)


def run_multihop(editor: Any, handle: ModelHandle, cases: list[Any], out_dir: Path, *, resume: bool = False,
                 on_case: Callable[[], None] | None = None) -> list[CaseResult]:
    """Per-case multi-hop results, written to ``out_dir/cases.jsonl`` as they finish (resumable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CASES_FILE
    if resume:  # the runner's reader: a torn last line is dropped and the file rewritten without it
        done = {str(k): r for k, r in read_cases(path, {str(c.case_id) for c in cases}).items()}
    else:
        done = {}
        atomic_write(path, "")
    results: list[CaseResult] = []
    for case in cases:
        if str(case.case_id) in done:
            results.append(done[str(case.case_id)])
            if on_case:
                on_case()
            continue
        t0 = time.perf_counter()
        pre = score_multihop(handle, case)
        edits, eff = apply_all(editor, handle, list(case.requests))
        try:
            post = score_multihop(handle, case)
        finally:
            revert_all(handle, edits)
        eff["wall_seconds"] = time.perf_counter() - t0  # the whole case: scoring before and after, edits, revert
        result = CaseResult(case.case_id, post=post, pre=pre, efficiency=eff,
                            info={"edits": len(case.requests), "source": case.source})
        with path.open("a") as f:
            f.write(json.dumps(result.to_dict()) + "\n")
        results.append(result)
        if on_case:
            on_case()
    return results
