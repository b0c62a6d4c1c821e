"""Check a run's arguments, apply the requests of one chunk together, and revert them with a check.

Applying: one ``compute`` over all of them when the editor batches (or
there is one), otherwise stacked one by one, each computed on the model that already holds the previous
ones. A multi-edit case (MQuAKE: 4 requests) is such a chunk. On any failure the edits applied so far are
reverted, so the model is left as it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..hooks import get_parameter
from ..metrics.efficiency import Measurement, measure
from ..metrics.scorers import scorer_for
from ..types import EditInputError, EditRequest
from .rundir import BenchmarkError

SETTINGS = ("single", "batch", "sequential")
EVAL_TIMINGS = ("immediate", "final")

if TYPE_CHECKING:
    from ..edits import Edit
    from ..models.handle import ModelHandle


class CannotStackEdits(EditInputError):
    """The editor neither batches nor stacks edits, so the requests of a multi-edit case cannot be applied."""


def edit_groups(editor: Any, requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
    """The ``compute`` calls that apply ``requests`` together: one batch, or one request each (stacked)."""
    caps = editor.capabilities
    if len(requests) <= 1 or caps.batch:
        return [list(requests)]
    if not caps.sequential:
        raise CannotStackEdits(f"{editor.name} edits one request at a time and cannot stack edits, so the "
                               f"{len(requests)} edits of a multi-edit case cannot be applied together; "
                               "choose a method that batches or stacks edits")
    return [[r] for r in requests]


def apply_together(editor: Any, handle: ModelHandle, requests: Sequence[EditRequest],
                   measurements: list[Measurement]) -> tuple[list[Edit], float]:
    """Compute and apply the edits of ``requests`` (see :func:`edit_groups`).

    Each ``compute`` is measured into ``measurements`` (appended as it starts, so a failed one is there
    too). Returns the applied edits in order and the seconds their ``apply`` took. Raises what ``compute``
    or ``apply`` raised, after reverting the edits applied so far.
    """
    applied: list[Edit] = []
    apply_s = 0.0
    try:
        for group in edit_groups(editor, requests):
            with measure() as m:
                measurements.append(m)
                edit = editor.compute(handle, group)
            t = time.perf_counter()
            edit.apply(handle)
            apply_s += time.perf_counter() - t
            applied.append(edit)
    except BaseException:
        for edit in reversed(applied):
            edit.revert(handle)
        raise
    return applied, apply_s


def check_args(editor: Any, handle: ModelHandle, cases: list, setting: str, batch_size: int, eval_timing: str) -> None:
    """Refuse a run that cannot work, before anything is computed or written (see run_benchmark's args)."""
    name = editor.name or type(editor).__name__
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r} is not one of {SETTINGS}")
    if eval_timing not in EVAL_TIMINGS:
        raise ValueError(f"eval_timing {eval_timing!r} is not one of {EVAL_TIMINGS}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if setting == "single" and batch_size != 1:
        raise ValueError("setting 'single' edits one case at a time; use setting='batch' for batch_size > 1")
    if batch_size > 1 and not editor.capabilities.batch:
        raise ValueError(f"{name} cannot edit several requests at once (capabilities.batch is false); "
                         "use batch_size=1")
    if setting == "sequential" and not editor.capabilities.sequential:
        raise ValueError(f"{name} cannot stack edits (capabilities.sequential is false); use setting 'single'")
    if not cases:
        raise EditInputError("run_benchmark needs a non-empty list of cases (EditCase records)")
    scorer_for(cases)  # every case is a benchmark case, and all of one kind
    if any(len(c.requests) > 1 for c in cases):
        caps = editor.capabilities
        if not (caps.batch or caps.sequential):
            raise CannotStackEdits(f"{name} can neither batch nor stack edits, so a case of several requests "
                                   "cannot be applied; choose a method that batches or stacks edits")
        if setting == "sequential" and not caps.batch:
            raise EditInputError(f"{name} does not batch, so in the sequential setting a case of several "
                                 "requests would be several edits per chunk; use the single setting")
    if handle.contexts:
        raise BenchmarkError("in-context edits are active on this handle; revert them before benchmarking")


def revert_checked(handle: ModelHandle, edits: list[Edit]) -> None:
    """Revert ``edits`` in reverse order, checking cheaply that every parameter an edit touched holds the
    values it had before that edit; then that no in-context edit is left."""
    from ..digests import tensor_digest

    for edit in reversed(edits):
        edit.revert(handle)
        for name, digest in getattr(edit, "base_digests", {}).items():
            if tensor_digest(get_parameter(handle.model, name)) != digest:
                raise BenchmarkError(f"parameter {name} was not restored by reverting the edit")
    if handle.contexts:
        raise BenchmarkError("an in-context edit is still active after its revert")
