"""Multi-hop accuracy on MQuAKE: after all of a case's edits are applied, ask its multi-hop questions.

Protocol (tag ``greedy_exact``). A case has k edits (4 in MQuAKE-hard), 3 paraphrased multi-hop questions
and a new answer with aliases. The benchmark runner applies the edits together (one ``compute`` over all k
requests when the editor batches, otherwise stacked one by one, each computed on the model that already
holds the previous ones). Then for every question q and every answer string a in {new_answer} ∪ aliases:

    answered(q, a) = 1{ for every answer token j: argmax_v p(v | q ␣ a_<j) = a_j }

i.e. teacher-forced token accuracy of a after q (joined by one space, as for ZsRE) is exactly 1. By
induction over j this is the same as "the greedy continuation of q begins with a's tokens", computed in one
batched forward instead of a generation loop. The case scores

    multihop = max_{q, a} answered(q, a)            (MQuAKE: any question answered with any alias)
    multihop_token_acc = max_{q, a} token_acc(q, a)  (a softer view, tag ``token_acc_max``)

The questions are asked as written (no few-shot or chain-of-thought prompt), so small models score near
zero before and after editing; ``pre`` holds the unedited model's scores for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .evaluate import Baseline
from .generate import GenSettings
from .records import Score
from .scorers import CaseScorer, register_scorer
from .scoring import score_targets

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

GREEDY_EXACT = "greedy_exact"  # the greedy continuation starts with the answer (checked by teacher forcing)
TOKEN_ACC_MAX = "token_acc_max"  # best teacher-forced token accuracy over questions x aliases


def _answers(case: Any) -> list[str]:
    return list(dict.fromkeys(a for a in (case.new_answer, *case.new_answer_alias) if a and a.strip()))


def score_multihop(handle: ModelHandle, case: Any, batch_size: int = 32) -> dict[str, Score]:
    """Score one case's questions against its new answers on the model as it is now."""
    pairs = [(q, a) for q in case.questions for a in _answers(case)]
    if not pairs:
        return {}
    scores = score_targets(handle, [q for q, _ in pairs], [a for _, a in pairs], batch_size)
    best_exact = max(float(s.accuracy == 1.0) for s in scores)
    best_acc = max(s.accuracy for s in scores)
    return {"multihop": Score(best_exact, GREEDY_EXACT, len(pairs)),
            "multihop_token_acc": Score(best_acc, TOKEN_ACC_MAX, len(pairs))}


@register_scorer("multihop")
class MultiHopScorer(CaseScorer):
    """MQuAKE cases: their own fixed protocol, so no asked protocol applies and no text is generated."""

    def protocols(self, asked: tuple[str, ...]) -> tuple[str, ...]:
        return ()

    def labels(self, protocols: Sequence[str], generation: GenSettings | None) -> list[str]:
        return [GREEDY_EXACT]

    def baseline(self, handle: ModelHandle, cases: Sequence[Any], *, protocols: Sequence[str],
                 generation: GenSettings | None) -> Baseline:
        return Baseline(locality=[[] for _ in cases], pre=[score_multihop(handle, c) for c in cases],
                        texts=[[] for _ in cases])

    def score(self, handle: ModelHandle, cases: Sequence[Any], base: Baseline, *, protocols: Sequence[str],
              generation: GenSettings | None) -> tuple[list[dict[str, Score]], list[list[dict[str, Any]]]]:
        return [score_multihop(handle, c) for c in cases], [[] for _ in cases]
