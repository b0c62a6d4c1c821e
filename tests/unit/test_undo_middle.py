"""Removing an edit from the middle of a stack of weight edits (lmedit.undo.remove_edit, rebuild=True)."""

from __future__ import annotations

import pytest

from lmedit import get_editor
from lmedit.edits import EditError, EditOrderError
from lmedit.registry import editor_class
from lmedit.types import EditRequest

REQS = [EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome"),
        EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
        EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="tennis")]
CORPUS = ["The tower is in Paris and it is tall.", "Michael Jordan played basketball for Chicago.",
          "Danielle Darrieux was a French actress who spoke French."]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS * 30) + "\n")
    return path


def _editor(method, corpus, home, monkeypatch):
    if method == "ft-m":
        return get_editor("ft-m", steps=3, lr=1e-2)
    monkeypatch.setenv("LMEDIT_HOME", str(home))
    return get_editor(method, **{**editor_class(method).quick, "mom2_corpus": str(corpus)})


@pytest.mark.parametrize("method", ["ft-m", "rome"])
def test_removing_the_middle_of_three_weight_edits_equals_applying_the_other_two(tiny_llama, corpus, tmp_path,
                                                                                  monkeypatch, method):
    h = tiny_llama
    base = h.state_digest()
    editor = _editor(method, corpus, tmp_path / "home", monkeypatch)
    e1, e2, e3 = (editor.compute(h, [r]).apply(h) for r in REQS)  # each computed on the model holding the earlier
    full = h.state_digest()
    with pytest.raises(EditOrderError, match="pass rebuild=True"):
        h.remove_edit(e2)
    assert h.state_digest() == full and h.applied_edits == (e1, e2, e3)

    assert h.remove_edit(e2, rebuild=True) == [e3]
    assert h.applied_edits == (e1, e3) and not e2.is_applied(h)
    removed = h.state_digest()
    assert removed not in (full, base)
    # the same two edits applied in order to the unedited model (e3 as stored, on weights without e2)
    e3.revert(h)
    e1.revert(h)
    assert h.state_digest() == base
    e1.apply(h)
    e3.apply(h, strict=False)
    assert h.state_digest() == removed
    # and the newest edit (plain revert) and a removed one (error, nothing changed)
    assert h.remove_edit(e3) == []
    with pytest.raises(EditError, match="not applied"):
        h.remove_edit(e2, rebuild=True)
    e1.revert(h)
    assert h.state_digest() == base


def test_a_failed_rebuild_puts_every_edit_back(tiny_llama, monkeypatch):
    h = tiny_llama
    editor = get_editor("ft-m", steps=3, lr=1e-2)
    e1, e2, e3 = (editor.compute(h, [r]).apply(h) for r in REQS)
    full = h.state_digest()
    real = type(e3)._apply
    tries = []

    def refuse(self, handle, strict, bound):  # e3 refuses its first re-application
        if self is e3 and not tries:
            tries.append(1)
            raise EditError("no longer fits")
        return real(self, handle, strict, bound)

    monkeypatch.setattr(type(e3), "_apply", refuse)
    with pytest.raises(EditError, match=r"re-applying the later edit .*Michael Jordan.* failed \(no longer fits\)"):
        h.remove_edit(e1, rebuild=True)
    monkeypatch.undo()
    assert h.applied_edits == (e1, e2, e3) and h.state_digest() == full
    for e in (e3, e2, e1):
        e.revert(h)


def test_memory_edits_leave_from_the_middle_without_a_rebuild(tiny_llama):
    h = tiny_llama
    editor = get_editor("grace", **editor_class("grace").quick)
    edits = [editor.compute(h, [r]).apply(h) for r in REQS]
    assert h.remove_edit(edits[1]) == []  # order-free: a plain revert, whatever rebuild says
    assert h.applied_edits == (edits[0], edits[2])
    for e in (edits[2], edits[0]):
        e.revert(h)
