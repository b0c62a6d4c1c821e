"""Score cases before and after an edit with the paper's metrics.

Token-accuracy protocol (Yao et al. 2023, tag ``token_acc``):
  reliability, generalization, portability_<group>: teacher-forced token accuracy of the answer;
  locality: agreement of the edited model's predicted tokens with the *original* model's (computed once,
  before any edit, in :func:`baseline`).
CounterFact probability protocol (ROME, tag ``prob_compare``), when the case knows the true answer:
  efficacy_score / paraphrase_score: P(new) > P(true); neighborhood_score: P(true) > P(new) on other subjects;
  *_magnitude: the probability differences. The summary adds score_s, their harmonic mean.
Generation protocol (selected as ``gen``; tags ``gen_em``, ``gen_f1``, ``gen_contains``): the model answers
freely and the answer is scored as text (:mod:`lmedit.metrics.gen_protocol`); the generated texts are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..kv import reusing_prefixes
from ..types import EditCase
from .gen_protocol import GEN, generate_records, scores_from_records
from .generate import GenSettings
from .records import PROB_COMPARE, TOKEN_ACC, CaseResult, Score
from .scoring import TargetScore, score_targets

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

TEACHER_FORCED = (TOKEN_ACC, PROB_COMPARE)  # what lmedit computed before the generation protocol existed
ALL_PROTOCOLS = (TOKEN_ACC, PROB_COMPARE, GEN)
KNOWN_PROTOCOLS = ALL_PROTOCOLS


def check_protocols(protocols: Sequence[str]) -> tuple[str, ...]:
    """The protocols, deduplicated; an unknown name is an error that lists the known ones."""
    out = tuple(dict.fromkeys(protocols))
    bad = [p for p in out if p not in KNOWN_PROTOCOLS]
    if bad or not out:
        raise ValueError(f"unknown scoring protocol(s) {bad or '(none given)'}; "
                         f"choose from {', '.join(KNOWN_PROTOCOLS)}")
    return out


@dataclass
class Baseline:
    """Outputs of the unedited model, computed once before any edit (locality compares against these)."""

    locality: list[list[TargetScore]] = field(default_factory=list)
    pre: list[dict[str, Score]] = field(default_factory=list)
    # the generation protocol's text records per case (empty when it was not computed)
    texts: list[list[dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    case: int
    metric: str
    prompt: str
    answer: str


def _items(cases: Sequence[EditCase], protocols: Sequence[str]) -> list[_Item]:
    items: list[_Item] = []
    for i, c in enumerate(cases):
        r = c.request
        if TOKEN_ACC in protocols:
            items.append(_Item(i, "reliability", r.text, r.target_new))
            items += [_Item(i, "generalization", p, r.target_new) for p in c.paraphrases]
            items += [_Item(i, "locality", q.prompt, q.answer) for q in c.locality]
            for group, qas in c.portability.items():
                items += [_Item(i, f"portability_{group}", q.prompt, q.answer) for q in qas]
        if PROB_COMPARE in protocols and r.target_true:
            for name, prompts in (("efficacy", [r.text]), ("paraphrase", list(c.paraphrases)),
                                  ("neighborhood", list(c.neighborhood))):
                for p in prompts:
                    items.append(_Item(i, f"{name}:new", p, r.target_new))
                    items.append(_Item(i, f"{name}:true", p, r.target_true))
    return items


def _score(handle: ModelHandle, items: list[_Item], batch_size: int) -> list[TargetScore]:
    return score_targets(handle, [it.prompt for it in items], [it.answer for it in items], batch_size)


def _aggregate(cases: Sequence[EditCase], items: list[_Item], scores: list[TargetScore],
               base_loc: list[list[TargetScore]] | None) -> tuple[list[dict[str, Score]], list[list[TargetScore]]]:
    per_case: list[dict[str, list[float]]] = [{} for _ in cases]
    loc_scores: list[list[TargetScore]] = [[] for _ in cases]
    pairs: dict[tuple[int, str], list[TargetScore]] = {}
    for it, s in zip(items, scores, strict=True):
        bucket = per_case[it.case]
        if it.metric == "locality":
            k = len(loc_scores[it.case])
            loc_scores[it.case].append(s)
            if base_loc is not None:
                bucket.setdefault("locality", []).append(s.agreement(base_loc[it.case][k]))
        elif ":" in it.metric:
            pairs.setdefault((it.case, it.metric), []).append(s)
        else:
            bucket.setdefault(it.metric, []).append(s.accuracy)
    out: list[dict[str, Score]] = []
    for i, bucket in enumerate(per_case):
        rec = {m: Score(sum(v) / len(v), TOKEN_ACC, len(v)) for m, v in bucket.items() if v}
        for name in ("efficacy", "paraphrase", "neighborhood"):
            new, true = pairs.get((i, f"{name}:new"), []), pairs.get((i, f"{name}:true"), [])
            if not new:
                continue
            if name == "neighborhood":  # the true answer should stay ahead
                wins = [t.prob > n.prob for n, t in zip(new, true, strict=True)]
                gaps = [t.prob - n.prob for n, t in zip(new, true, strict=True)]
            else:
                wins = [n.prob > t.prob for n, t in zip(new, true, strict=True)]
                gaps = [n.prob - t.prob for n, t in zip(new, true, strict=True)]
            rec[f"{name}_score"] = Score(sum(wins) / len(wins), PROB_COMPARE, len(wins))
            rec[f"{name}_magnitude"] = Score(sum(gaps) / len(gaps), PROB_COMPARE, len(gaps))
        out.append(rec)
    return out, loc_scores


def baseline(handle: ModelHandle, cases: Sequence[EditCase], *, protocols: Sequence[str] = ALL_PROTOCOLS,
             batch_size: int = 32, generation: GenSettings | None = None) -> Baseline:
    """Score the unedited model once: pre-edit metrics and the locality predictions (and, for the
    generation protocol, the answers) to compare against."""
    if handle.contexts:
        raise RuntimeError("baseline must be computed on the unedited model, but in-context edits are active")
    items = _items(cases, protocols)
    scores = _score(handle, items, batch_size)
    pre, loc = _aggregate(cases, items, scores, None)
    texts: list[list[dict[str, Any]]] = []
    if GEN in protocols:
        texts = generate_records(handle, cases, generation or GenSettings())
        for p, recs in zip(pre, texts, strict=True):
            p.update(scores_from_records(recs))
    return Baseline(locality=loc, pre=pre, texts=texts)


def score_cases_with_texts(handle: ModelHandle, cases: Sequence[EditCase], base: Baseline, *,
                           protocols: Sequence[str] = ALL_PROTOCOLS, batch_size: int = 32,
                           generation: GenSettings | None = None
                           ) -> tuple[list[dict[str, Score]], list[list[dict[str, Any]]]]:
    """Score the model as it is now (edited) against the baseline of the original model; also returns the
    generation protocol's text records per case (empty lists without it)."""
    with reusing_prefixes(handle.model):  # an in-context edit's context runs once, not once per batch
        return _score_cases_with_texts(handle, cases, base, protocols, batch_size, generation)


def _score_cases_with_texts(handle: ModelHandle, cases: Sequence[EditCase], base: Baseline,
                            protocols: Sequence[str], batch_size: int, generation: GenSettings | None
                            ) -> tuple[list[dict[str, Score]], list[list[dict[str, Any]]]]:
    items = _items(cases, protocols)
    scores = _score(handle, items, batch_size)
    post, _ = _aggregate(cases, items, scores, base.locality)
    texts: list[list[dict[str, Any]]] = [[] for _ in cases]
    if GEN in protocols:
        if len(base.texts) != len(cases):
            raise ValueError("the baseline has no generated answers for these cases; compute it with the "
                             "generation protocol")
        texts = generate_records(handle, cases, generation or GenSettings())
        for p, recs, before in zip(post, texts, base.texts, strict=True):
            p.update(scores_from_records(recs, before))
    return post, texts


def score_cases(handle: ModelHandle, cases: Sequence[EditCase], base: Baseline, *,
                protocols: Sequence[str] = ALL_PROTOCOLS, batch_size: int = 32,
                generation: GenSettings | None = None) -> list[dict[str, Score]]:
    """Score the model as it is now (edited) against the baseline of the original model."""
    return score_cases_with_texts(handle, cases, base, protocols=protocols, batch_size=batch_size,
                                  generation=generation)[0]


def evaluate(handle: ModelHandle, cases: Sequence[EditCase], edit: Any = None, *,
             protocols: Sequence[str] = ALL_PROTOCOLS, batch_size: int = 32,
             base: Baseline | None = None, generation: GenSettings | None = None) -> list[CaseResult]:
    """Per-case results for ``edit`` on ``cases``: pre-edit scores, then the edit applied, scored, reverted.

    With ``edit=None`` the model is scored as it is (post == the current model) -- for edits already
    applied, pass the ``base`` computed before applying them.
    """
    cases = list(cases)
    kw = {"protocols": protocols, "batch_size": batch_size, "generation": generation}
    if base is None:
        base = baseline(handle, cases, **kw)
    if edit is None:
        post, texts = score_cases_with_texts(handle, cases, base, **kw)
    else:
        with edit.applied(handle):
            post, texts = score_cases_with_texts(handle, cases, base, **kw)
    pre_texts = base.texts or [[] for _ in cases]
    return [CaseResult(c.case_id, post=p, pre={k: v for k, v in pre.items()},
                       texts={"pre": b, "post": t} if (b or t) else {})
            for c, p, pre, t, b in zip(cases, post, base.pre, texts, pre_texts, strict=True)]
