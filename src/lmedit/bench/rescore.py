"""Rescore a finished run from the generated texts it kept, without the model.

:func:`rescore_run` reads ``cases.jsonl``, rescores every case (:func:`lmedit.metrics.rescore.rescore_case`:
the generation-protocol scores from its text records, optionally an LLM judge's verdicts) and writes
``cases.jsonl``, ``summary.json`` and ``table.md`` again. Teacher-forced scores stay as they are.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..io import atomic_write, folder_lock
from ..metrics.gen_protocol import GEN
from ..metrics.records import CaseResult
from ..metrics.rescore import rescore_case
from .rundir import CASES_FILE, RUN_FILE, SUMMARY_FILE, TABLE_FILE
from .summary import build_summary, render_table

log = logging.getLogger(__name__)

# summary fields computed from the cases (build_summary writes them again)
_COMPUTED = ("post", "pre", "n_errors", "n_already_true", "efficiency", "lmedit_version", "git_commit",
             "missing_protocols")


def rescore_run(run_dir: str | Path, *, judge: Any = None) -> dict[str, Any]:
    """Rescore the run in ``run_dir`` (see the module docstring); returns the new summary. Holds the run
    directory's lock (:func:`lmedit.io.folder_lock`): a run still writing there is never rescored."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir} holds no run (it is not a folder); give an lmedit bench output folder")
    with folder_lock(run_dir, what=f"run directory {run_dir}"):
        return _rescore(Path(run_dir), judge)


def _rescore(out: Path, judge: Any) -> dict[str, Any]:
    if not (out / CASES_FILE).exists() or not (out / RUN_FILE).exists():
        raise FileNotFoundError(f"{out} holds no run (no {CASES_FILE} and {RUN_FILE}); give an lmedit bench "
                                "output folder")
    header = json.loads((out / RUN_FILE).read_text())
    if GEN not in (header.get("protocols") or []):
        log.warning("%s was run without the generation protocol: nothing to rescore", out)
    lines = [json.loads(line) for line in (out / CASES_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    results, rows = [], []
    for line in lines:
        res = rescore_case(CaseResult.from_dict(line), judge)
        results.append(res)
        rows.append({**res.to_dict(), **({"setting": line["setting"]} if "setting" in line else {})})
    atomic_write(out / CASES_FILE, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    try:
        old = json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        old = {**{k: v for k, v in header.items() if k != "case_ids"}, "n_cases": len(results)}
    summary = build_summary(results, {k: v for k, v in old.items() if k not in _COMPUTED})
    summary["rescored"] = {"from_texts": sum(bool(r.texts) for r in results),
                           **({"judge": judge.stats()} if judge is not None else {})}
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
    atomic_write(out / TABLE_FILE, render_table(summary))
    return summary
