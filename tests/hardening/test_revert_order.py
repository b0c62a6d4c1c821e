"""Edits are undone newest first; anything else is refused with nothing changed (issue 15, defect 2)."""

from __future__ import annotations

import pytest

from lmedit import get_editor
from lmedit.edits import EditError, EditOrderError, PromptContext
from lmedit.methods.calinet import CaliNet
from lmedit.types import EditRequest

A = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome")
B = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
FT = {"steps": 3, "lr": 1e-2}


def _editor(method):
    return get_editor(method, **({**CaliNet.quick, "steps": 3} if method == "calinet" else FT))


@pytest.mark.parametrize("method", ["calinet", "ft-m"])
def test_out_of_order_revert_is_refused_and_in_order_revert_is_exact(tiny_llama, method):
    """The issue's two reproductions: CaliNet (A's wrapper came back with base=None, generate raised
    TypeError) and FT-M (A's delta stayed in the weights after both reverts)."""
    h = tiny_llama
    before = h.state_digest()
    editor = _editor(method)
    a = editor.compute(h, [A]).apply(h)
    b = editor.compute(h, [B]).apply(h)  # computed on the model that holds A
    assert h.applied_edits == (a, b)
    edited = h.state_digest()
    with pytest.raises(EditOrderError, match=r"revert them first.*applied_edits"):
        a.revert(h)
    assert h.applied_edits == (a, b) and h.state_digest() == edited and a.is_applied(h)
    h.generate("The capital of France is", max_new_tokens=2)  # the model still works
    b.revert(h)
    a.revert(h)
    assert h.applied_edits == () and h.state_digest() == before
    h.generate("The capital of France is", max_new_tokens=2)


def test_order_error_names_the_edits_to_revert_first(tiny_llama):
    h = tiny_llama
    fp = {"model_fingerprint": h.fingerprint}
    edits = [PromptContext(f"Fact {i}. ", meta={**fp, "method": "ike", "requests": [{"prompt": f"p{i}",
                                                                                     "target_new": f"t{i}"}]})
             for i in range(3)]
    for e in edits:
        e.apply(h)
    with pytest.raises(EditOrderError) as info:
        edits[0].revert(h)
    msg = str(info.value)
    assert "2 edit(s)" in msg and msg.index("'p2'") < msg.index("'p1'")  # newest first
    assert h.render("q") == "Fact 0. Fact 1. Fact 2. q"
    for e in reversed(edits):
        e.revert(h)
    assert h.render("q") == "q" and h.applied_edits == ()


def test_context_manager_and_double_revert(tiny_llama):
    h = tiny_llama
    e = PromptContext("x ", meta={"model_fingerprint": h.fingerprint})
    with e.applied(h):
        assert h.applied_edits == (e,)
    assert h.applied_edits == ()
    with pytest.raises(EditError, match="not applied"):
        e.revert(h)


def test_failed_apply_leaves_the_stack_alone(tiny_llama):
    import torch

    from lmedit.edits import WeightDelta

    h = tiny_llama
    name = h.adapter.mlp_out.format(0) + ".weight"
    bad = WeightDelta({name: torch.full_like(h.model.get_parameter(name), float("nan"))})
    with pytest.raises(EditError, match="NaN"):
        bad.apply(h)
    assert h.applied_edits == ()
