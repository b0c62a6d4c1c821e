"""Rescore a finished run from the generated texts it kept, without the model.

:func:`rescore_run` reads ``cases.jsonl``, recomputes every generation-protocol score of every case from its
text records (the current normalisation and answer extraction), optionally asks an LLM judge about the
same answers (tag ``gen_judge``), and writes ``cases.jsonl``, ``summary.json`` and ``table.md`` again. The
teacher-forced scores are left as they are. A case without text records (failed edit, or scored before the
generation protocol existed) keeps what it had and is counted in the summary's ``missing_protocols``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .gen_protocol import GEN, is_gen_key, judge_scores, scores_from_records
from .records import CaseResult

log = logging.getLogger(__name__)

# summary fields computed from the cases (build_summary writes them again)
_COMPUTED = ("post", "pre", "n_errors", "n_already_true", "efficiency", "lmedit_version", "git_commit",
             "missing_protocols")


def rescore_case(res: CaseResult, judge: Any = None) -> CaseResult:
    """``res`` with its generation scores recomputed from its text records (unchanged when it has none)."""
    if not res.texts:
        return res
    pre_texts, post_texts = res.texts.get("pre", []), res.texts.get("post", [])
    pre = {k: v for k, v in res.pre.items() if not is_gen_key(k)}
    post = {k: v for k, v in res.post.items() if not is_gen_key(k)}
    pre.update(scores_from_records(pre_texts))
    if post_texts:
        post.update(scores_from_records(post_texts, pre_texts))
    if judge is not None:
        pre.update(judge_scores(pre_texts, judge))
        post.update(judge_scores(post_texts, judge))
    return CaseResult(res.case_id, post=post, pre=pre, efficiency=res.efficiency, info=res.info, texts=res.texts,
                      protocols=res.protocols)


def rescore_run(run_dir: str | Path, *, judge: Any = None) -> dict[str, Any]:
    """Rescore the run in ``run_dir`` (see the module docstring); returns the new summary."""
    from ..benchmark import CASES_FILE, RUN_FILE, SUMMARY_FILE, TABLE_FILE, build_summary, render_table

    out = Path(run_dir)
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
    tmp = out / (CASES_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out / CASES_FILE)
    try:
        old = json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        old = {**{k: v for k, v in header.items() if k != "case_ids"}, "n_cases": len(results)}
    summary = build_summary(results, {k: v for k, v in old.items() if k not in _COMPUTED})
    summary["rescored"] = {"from_texts": sum(bool(r.texts) for r in results),
                           **({"judge": judge.stats()} if judge is not None else {})}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    (out / TABLE_FILE).write_text(render_table(summary), encoding="utf-8")
    return summary
