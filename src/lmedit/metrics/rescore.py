"""Rescore a case from the generated texts it kept, without the model (a whole run: :mod:`lmedit.bench.rescore`).

:func:`rescore_case` recomputes every generation-protocol score of every case from its
text records (the current normalisation and answer extraction), optionally asks an LLM judge about the
same answers (tag ``gen_judge``), and writes ``cases.jsonl``, ``summary.json`` and ``table.md`` again. The
teacher-forced scores are left as they are. A case without text records (failed edit, or scored before the
generation protocol existed) keeps what it had and is counted in the summary's ``missing_protocols``.
"""

from __future__ import annotations

import logging
from typing import Any

from .gen_protocol import is_gen_key, judge_scores, scores_from_records
from .records import CaseResult

log = logging.getLogger(__name__)



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
