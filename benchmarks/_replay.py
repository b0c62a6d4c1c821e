"""Shared by the benchmark scripts that study a finished sequential run: re-apply its saved edits in order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmedit.edits import Edit
from lmedit.metrics.efficiency import release_freed_memory


def saved_cases(run: Path) -> int:
    """How many cases of the sequential run in ``run`` have a saved outcome (``edits/<k>/chunk.json``)."""
    k = 0
    while (run / "edits" / str(k) / "chunk.json").exists():
        k += 1
    return k


def replayed(run: Path, handle, n: int | None = None, *, strict: bool = True) -> Iterator[tuple[int, Edit | None]]:
    """Apply the run's saved edits to ``handle`` in order, one chunk at a time: yields (chunk index, the applied
    edit, or None where the run refused or failed that chunk's edit and so saved none); freed heap is handed
    back after each, as in the run, so that hundreds of weight edits fit in memory. ``strict=False`` lets a
    weight edit land on parameters other than those it was computed on (a caller that left an edit out)."""
    for k in range(saved_cases(run) if n is None else n):
        chunk = json.loads((run / "edits" / str(k) / "chunk.json").read_text())
        edit = (None if chunk.get("error") is not None
                else Edit.load(run / "edits" / str(k)).apply(handle, strict=strict))
        release_freed_memory()  # as the runner does: without it glibc keeps every loaded edit's pages
        yield k, edit
