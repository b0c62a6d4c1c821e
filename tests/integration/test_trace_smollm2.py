"""Causal tracing on the real SmolLM2-135M: one known fact, few samples, two token rows (well under 60 s)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_known_fact_trace(smollm2):
    from lmedit.tracing import Tracer
    from lmedit.tracing.aggregate import select_known

    try:
        facts, skipped = select_known(smollm2, None, 1)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    fact = facts[0]
    tracer = Tracer(smollm2, fact["prompt"], fact["subject"], samples=3, answer=fact["attribute"])
    assert tracer.correct_prediction
    # 3-sigma noise from the known-facts subjects removes much of the answer's probability
    assert tracer.noise > 0 and tracer.low_score < 0.8 * tracer.high_score
    b, e = tracer.subject_range
    last = len(tracer.ids) - 1
    # restoring the subject's embeddings undoes the corruption exactly
    undone = tracer.restore([{smollm2.adapter.embed: list(range(b, e))}])[0]
    assert undone == pytest.approx(tracer.high_score, rel=1e-4)
    hidden = tracer.trace("hidden", token_range=[e - 1, last])
    # the final clean state at the last token carries the prediction whole
    assert hidden.scores[last, -1] == pytest.approx(tracer.high_score, rel=1e-3)
    # the early state of the last subject token carries part of the fact
    assert hidden.scores[e - 1, 0] > tracer.low_score
    mlp = tracer.trace("mlp", token_range=[e - 1])
    row = mlp.scores[e - 1]
    assert np.isfinite(row).all() and row.max() > tracer.low_score
