"""Removing any one edit of a model's stack of applied edits, including one from under later weight edits.

``edit.revert(handle)`` undoes the newest edit, or any *order-free* edit (a memory entry, a LoRA adapter),
bit-exactly. A weight edit under later edits cannot simply be reverted: the later deltas were added on top
of it. :func:`remove_edit` with ``rebuild=True`` removes it anyway:

1. revert the edits applied after it, newest first (each revert is bit-exact);
2. revert it (the model is now exactly as before it was applied);
3. re-apply the later edits, oldest first, **from their stored Edit objects** (their deltas, entries or
   adapters as computed then; nothing is recomputed), without the base-weight check (``strict=False``:
   they were computed on weights that held the removed edit) and without the update bound (they were
   accepted when first applied).

The result is bit-identical to applying the remaining edits, in order, to the model as it was before the
removed one. It is **not** the model that never had the removed edit: an editor that computes an edit
from the current weights (ROME, MEMIT, FT, ...) computed every later edit on weights that held the
removed one, so a later edit may lean on it (MEMIT's covariance-corrected update, FT's gradient at those
weights). To get that model, recompute the later edits instead (revert them, revert this one, and run the
editor again on their requests). Memory editors never have this problem: their entries do not depend on
each other, and removing one is exact in any order.

If re-applying fails part way (an edit that no longer fits), everything is put back as it was before the
call (the removed edit and all later ones, bit-exactly) and :class:`EditError` says which edit failed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .edits import Edit, EditError, EditOrderError

if TYPE_CHECKING:
    from .models.handle import ModelHandle

log = logging.getLogger(__name__)


def remove_edit(handle: ModelHandle, edit: Edit, *, rebuild: bool = False) -> list[Edit]:
    """Remove ``edit`` from the edits applied to ``handle`` (see the module docstring).

    Args:
        handle: the model the edit is applied to.
        edit: any applied edit (``handle.applied_edits`` lists them, oldest first).
        rebuild: when later non-order-free edits sit on top of ``edit``, revert them, revert ``edit`` and
            re-apply them from their stored objects; without it such a removal raises
            :class:`EditOrderError` with nothing changed.

    Returns:
        the later edits that were re-applied (empty when a plain revert sufficed).
    """
    if not edit.is_applied(handle):
        raise EditError(f"{edit.label()} is not applied to {handle.name!r}; nothing to remove (was it removed "
                        "already? handle.applied_edits lists the applied edits)")
    stack = list(handle.applied_edits)
    later = stack[stack.index(edit) + 1:] if edit in stack else []
    if edit.order_free or not later:
        edit.revert(handle)
        return []
    if not rebuild:
        raise EditOrderError(
            f"cannot remove {edit.label()}: {len(later)} edit(s) were applied after it; pass rebuild=True to "
            "revert them, remove it and re-apply them from their stored edits (not recomputed; see "
            "lmedit.undo), or revert them first, newest first; nothing was changed")
    for e in reversed(later):
        e.revert(handle)
    edit.revert(handle)
    done: list[Edit] = []
    try:
        for e in later:
            e.apply(handle, strict=False, max_relative_update=None)
            done.append(e)
    except EditError as err:
        for e in reversed(done):
            e.revert(handle)
        for e in [edit, *later]:  # as before the call: the same values, added to the same weights
            e.apply(handle, strict=False, max_relative_update=None)
        raise EditError(f"could not remove {edit.label()}: re-applying the later edit {later[len(done)].label()} "
                        f"failed ({err}); every edit is applied again as before the call") from err
    log.info("removed %s and re-applied the %d later edit(s) on top of the remaining ones", edit.label(), len(later))
    return done
