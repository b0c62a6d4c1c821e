"""The generation protocol (selected as ``gen``): the model answers freely, and its answer is scored as text.

For each case the model generates greedily (:mod:`lmedit.metrics.generate`) from the reliability prompt, each
paraphrase, each portability question and each locality question. Every generation is kept as a *text
record* (metric, prompt, gold, generated text, stop reason, token count); the scores are computed from the
records alone (:func:`scores_from_records`), so a run can be rescored later without the model.

Scores (each under its own protocol tag; metric keys are ``<metric>@<tag>``):
- ``reliability@gen_em`` / ``@gen_f1`` / ``@gen_contains`` (and generalization, portability_<group>): the
  answer against the gold (:mod:`lmedit.metrics.answers`);
- ``locality@gen_em`` / ``locality@gen_f1``: the edited model's answer against the *unedited* model's
  answer to the same question (it did not change);
- ``locality_truth@gen_em`` / ``@gen_f1`` / ``@gen_contains``: the answer against the locality ground truth.
A gold that normalises to nothing is not scored (logged); a metric none of whose items could be scored is
absent, never zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..types import EditCase
from .answers import EmptyGoldError, agree, contains, exact_match, extract_answer, token_f1
from .generate import GenSettings, frame, generate_texts
from .records import Score

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

GEN = "gen"  # the protocol as selected (``--protocols token_acc,gen``)
GEN_EM, GEN_F1, GEN_CONTAINS = "gen_em", "gen_f1", "gen_contains"  # the tags its numbers carry
GEN_JUDGE = "gen_judge"  # an LLM judge's verdict on the same texts (lmedit.metrics.judge)
GEN_TAGS = (GEN_EM, GEN_F1, GEN_CONTAINS)
SEP = "@"
LOCALITY, LOCALITY_TRUTH = "locality", "locality_truth"
_SCORERS = ((GEN_EM, exact_match), (GEN_F1, token_f1), (GEN_CONTAINS, contains))


def metric_key(metric: str, tag: str) -> str:
    return f"{metric}{SEP}{tag}"


def split_key(key: str) -> tuple[str, str | None]:
    """(metric, tag) of a metric key; the tag is None for the teacher-forced metrics' bare names."""
    metric, sep, tag = key.partition(SEP)
    return (metric, tag) if sep else (key, None)


def is_gen_key(key: str) -> bool:
    return (split_key(key)[1] or "").startswith(GEN)


@dataclass(frozen=True)
class GenItem:
    case: int
    metric: str
    prompt: str
    gold: str


def gen_items(cases: Sequence[EditCase]) -> list[GenItem]:
    """The prompts each case is asked, with the answer each should get."""
    items: list[GenItem] = []
    for i, c in enumerate(cases):
        r = c.request
        items.append(GenItem(i, "reliability", r.text, r.target_new))
        items += [GenItem(i, "generalization", p, r.target_new) for p in c.paraphrases]
        for group, qas in c.portability.items():
            items += [GenItem(i, f"portability_{group}", q.prompt, q.answer) for q in qas]
        items += [GenItem(i, LOCALITY, q.prompt, q.answer) for q in c.locality]
    return items


def generate_records(handle: ModelHandle, cases: Sequence[EditCase],
                     settings: GenSettings) -> list[list[dict[str, Any]]]:
    """Generate every case's answers on the model as it is now; one list of text records per case."""
    items = gen_items(cases)
    framed = [frame(handle, it.prompt, settings.context) for it in items]
    unique = list(dict.fromkeys(framed))  # a question asked twice is generated once
    gens = dict(zip(unique, generate_texts(handle, unique, max_new_tokens=settings.max_new_tokens,
                                           batch_size=settings.batch_size), strict=True))
    out: list[list[dict[str, Any]]] = [[] for _ in cases]
    for it, f in zip(items, framed, strict=True):
        g = gens[f]
        out[it.case].append({"metric": it.metric, "prompt": it.prompt, "gold": it.gold, "text": g.text,
                             "stop": g.stop, "tokens": g.tokens})
    return out


def _mean(values: list[float], tag: str) -> Score:
    return Score(sum(values) / len(values), tag, len(values))


def scores_from_records(records: list[dict[str, Any]], before: list[dict[str, Any]] | None = None) -> dict[str, Score]:
    """The generation scores of one case from its text records; ``before``: the unedited model's records of
    the same case (post-edit locality compares against them; None for the pre-edit scores)."""
    per: dict[str, list[float]] = {}
    for rec in records:
        answer = extract_answer(rec["text"])
        metric = LOCALITY_TRUTH if rec["metric"] == LOCALITY else rec["metric"]
        try:
            for tag, fn in _SCORERS:
                per.setdefault(metric_key(metric, tag), []).append(fn(answer, rec["gold"]))
        except EmptyGoldError as e:
            log.warning("not scoring %s of %r: %s", rec["metric"], rec["prompt"], e)
    if before is not None:
        post_loc = [r for r in records if r["metric"] == LOCALITY]
        pre_loc = [r for r in before if r["metric"] == LOCALITY]
        if len(post_loc) != len(pre_loc):
            raise ValueError(f"{len(post_loc)} locality answers after the edit but {len(pre_loc)} before")
        for a, b in zip(post_loc, pre_loc, strict=True):
            em, f1 = agree(extract_answer(a["text"]), extract_answer(b["text"]))
            per.setdefault(metric_key(LOCALITY, GEN_EM), []).append(em)
            per.setdefault(metric_key(LOCALITY, GEN_F1), []).append(f1)
    return {k: _mean(v, split_key(k)[1]) for k, v in per.items() if v}


def scope_labels(protocols: Sequence[str], settings: GenSettings | None) -> list[str]:
    """The protocols as a store scope names them: ``gen`` with the settings that change its answers (the
    teacher-forced names as they were, so scores stored before the generation protocol stay valid)."""
    key = (settings or GenSettings()).key()
    return [f"{GEN}({key['context']},{key['max_new_tokens']})" if p == GEN else p for p in protocols]


def judge_scores(records: list[dict[str, Any]], judge: Any) -> dict[str, Score]:
    """``<metric>@gen_judge``: the fraction of a case's answers that ``judge`` (a
    :class:`~lmedit.metrics.judge.Judge`) grades CORRECT against their gold; ungraded answers are left out."""
    per: dict[str, list[float]] = {}
    for rec in records:
        verdict = judge.grade(rec["prompt"], rec["gold"], extract_answer(rec["text"]))
        if verdict is not None:
            metric = LOCALITY_TRUTH if rec["metric"] == LOCALITY else rec["metric"]
            per.setdefault(metric_key(metric, GEN_JUDGE), []).append(float(verdict == "CORRECT"))
    return {k: _mean(v, GEN_JUDGE) for k, v in per.items()}
