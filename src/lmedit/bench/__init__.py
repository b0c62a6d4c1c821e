"""The benchmark runner: edit cases one by one, in batches or cumulatively, and score every edit.

- :mod:`.run` -- :func:`run_benchmark`, the settings (single, batch, sequential) and what a failed edit does;
- :mod:`.rundir` -- the run directory: ``run.json``, ``cases.jsonl``, resume, extension and lent cases;
- :mod:`.summary` -- per-protocol means, Score S and ``table.md``;
- :mod:`.rescore` -- a finished run rescored from the texts it kept, without the model;
- :mod:`.stores` -- edits and baseline scores shared between runs and table cells.
"""

from .run import EVAL_TIMINGS, SETTINGS, BenchmarkResult, run_benchmark
from .rundir import (
    CASES_FILE,
    EDITS_DIR,
    RUN_FILE,
    SUMMARY_FILE,
    TABLE_FILE,
    BenchmarkError,
    adopt_cases,
    case_keys,
    lendable_cases,
    run_header,
)
from .summary import build_summary, render_table

__all__ = ["CASES_FILE", "EDITS_DIR", "EVAL_TIMINGS", "RUN_FILE", "SETTINGS", "SUMMARY_FILE", "TABLE_FILE",
           "BenchmarkError", "BenchmarkResult", "adopt_cases", "build_summary", "case_keys", "lendable_cases",
           "render_table", "run_benchmark", "run_header"]
