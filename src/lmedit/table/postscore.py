"""What a table adds to its cells after their runs: an LLM judge's grades and the capability drift.

- :func:`judge_cells`: the judge (:class:`lmedit.metrics.judge.Judge`) grades the generated answers that
  every finished cell's runs kept (:func:`lmedit.bench.rescore.rescore_run`; no edit is computed again), and
  the cell gains the ``<metric>@gen_judge`` scores, stored in its ``cell.json`` without touching its key. A
  cell the same judge already graded is left alone; a judge that is down grades nothing, the cells keep their
  other numbers and a later table tries again.
- :func:`cell_drift`: the perplexity drift of a batch or sequential cell, from the drift its runs measured
  (:mod:`lmedit.metrics.drift`): the ratio of the edited model's perplexity to the unedited model's, averaged
  over the cell's sequences, with both perplexities and the n-gram entropies beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from ..bench.rundir import CASES_FILE, RUN_FILE
from ..io import LockedError
from ..metrics.drift import NGRAM_ENTROPY, PERPLEXITY
from ..metrics.gen_protocol import GEN
from ..metrics.records import CaseResult, summarize
from .cells import CellCache, CellResult

log = logging.getLogger(__name__)

JUDGE_INFO = "judge"  # cell.info key: the judge (url, model) that graded the cell
DRIFT_INFO = "drift"  # cell.info key: the cell's drift (see cell_drift)


def _run_folders(cache: CellCache, cell: CellResult) -> list[Path]:
    """The cell's run folders that were scored with the generation protocol (multi-hop runs are not)."""
    out = []
    for folder in sorted(cache.folder(cell.spec).glob("run-*")):
        try:
            header = json.loads((folder / RUN_FILE).read_text())
        except (OSError, ValueError):
            continue
        if GEN in (header.get("protocols") or []) and (folder / CASES_FILE).exists():
            out.append(folder)
    return out


def judge_cells(cells: list[CellResult], cache: CellCache, judge: Any) -> dict[str, Any]:
    """Let ``judge`` grade the generated answers of every finished cell (see the module docstring); the
    cells are updated in place and stored again. Returns the judge's stats and the cells it graded."""
    from ..bench.rescore import rescore_run

    who = {"url": judge.url, "model": judge.model}
    graded: list[str] = []
    for cell in cells:
        if cell.status != "ok" or cell.info.get(JUDGE_INFO) == who:
            continue
        folders = _run_folders(cache, cell)
        if not folders:
            continue
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(cache.locked(cell.spec))
            except LockedError as e:
                log.warning("cell %s: not judged, another process is computing it (%s)", cell.spec.name, e)
                continue
            for folder in folders:
                rescore_run(folder, judge=judge)
            if judge.down is not None:  # nothing graded (or only part): keep the cell as it was
                continue
            results = [CaseResult.from_dict(json.loads(line)) for folder in folders
                       for line in (folder / CASES_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
            cell.post, cell.pre = summarize(results, "post"), summarize(results, "pre")
            cell.info[JUDGE_INFO] = who
            cache.store(cell)
        graded.append(cell.spec.name)
    stats = {**judge.stats(), "graded_cells": graded}
    if judge.down is not None:
        log.warning("the LLM judge is down (%s): the table has no gen_judge rows for the cells it did not grade; "
                    "its other numbers stand", judge.down)
    return stats


def cell_drift(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The drift of a cell from its runs' summaries (one per sequence), or None when none measured it."""
    changes = [s["drift"]["change"] for s in summaries if (s.get("drift") or {}).get("change")]
    if not changes:
        return None

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    ppl = [c[PERPLEXITY] for c in changes]
    ent = [c[NGRAM_ENTROPY] for c in changes]
    return {"perplexity_ratio": mean([p["after"] / p["before"] for p in ppl]),
            "perplexity_before": mean([p["before"] for p in ppl]), "perplexity_after": mean([p["after"] for p in ppl]),
            "ngram_entropy_before": mean([e["before"] for e in ent]),
            "ngram_entropy_after": mean([e["after"] for e in ent]),
            "tokens": summaries[0]["drift"]["settings"]["tokens"], "sequences": len(changes)}
