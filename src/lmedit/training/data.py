"""Training examples for trained editors: (edit, rephrase, locality) triples cut from EditCases.

Every meta-training step of MEND / KE / SERAC needs the same three things per fact (Mitchell et al. 2022,
§3): the edit pair (x_e, y_e), an equivalent input x_e' (a rephrase, scored against y_e), and an unrelated
input x_loc whose predictions must not move. Validation uses a held-back slice of the *training* cases;
evaluation files are never read here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..types import QA, EditCase, EditInputError, EditRequest


@dataclass(frozen=True)
class TrainExample:
    """One meta-training example.

    Attributes:
        request: the edit (x_e, y_e) the editor receives.
        rephrase: an equivalent prompt x_e', scored against ``request.target_new``.
        loc: an unrelated prompt and its answer (teacher-forced continuation for the KL term).
    """

    request: EditRequest
    rephrase: str
    loc: QA


def examples_from_cases(cases: Sequence[EditCase]) -> list[TrainExample]:
    """Turn cases into training examples; a case without a paraphrase or a locality prompt is an error."""
    out = []
    for i, c in enumerate(cases):
        where = c.source or f"case #{i} (case_id={c.case_id!r})"
        if not isinstance(c, EditCase):
            raise EditInputError(f"training data item #{i} is a {type(c).__name__}, not an EditCase")
        if not c.paraphrases or not str(c.paraphrases[0]).strip():
            raise EditInputError(f"training case {where} has no paraphrase; trained editors need one rephrase "
                                 "per case (the 'rephrase' field of ZsRE / 'rephrase_prompt' of CounterFact)")
        if not c.locality or not c.locality[0].prompt.strip() or not c.locality[0].answer.strip():
            raise EditInputError(f"training case {where} has no locality prompt with an answer; trained editors "
                                 "need one (the 'loc'/'loc_ans' fields of ZsRE, 'locality_prompt' of CounterFact)")
        out.append(TrainExample(c.request, c.paraphrases[0], c.locality[0]))
    if not out:
        raise EditInputError("no training cases given")
    return out


def split(examples: Sequence[TrainExample], val_size: int) -> tuple[list[TrainExample], list[TrainExample]]:
    """Hold back the *last* ``val_size`` examples for validation (at most half; at least one if possible)."""
    examples = list(examples)
    n_val = min(max(0, val_size), len(examples) // 2)
    if n_val == 0 and len(examples) >= 2:
        n_val = 1
    if n_val == 0:
        return examples, []
    return examples[:-n_val], examples[-n_val:]


def batch_for_step(examples: Sequence[TrainExample], step: int, batch_size: int, seed: int) -> list[TrainExample]:
    """The batch used at ``step``: a pure function of (seed, step), so a resumed run sees the same data."""
    rng = random.Random(seed * 1_000_003 + step)
    k = min(batch_size, len(examples))
    return [examples[i] for i in rng.sample(range(len(examples)), k)]


def val_batches(examples: Sequence[TrainExample], batch_size: int, max_batches: int) -> list[list[TrainExample]]:
    """Fixed validation batches (the same every time, so validation numbers are comparable)."""
    out = [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    return out[:max_batches] if max_batches > 0 else out
