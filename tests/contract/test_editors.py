"""The Editor contract: every registered editor × every tiny model family (design.md §9).

The families are the registered table's (``FAMILIES``) and eight classes outside it whose adapters are
discovered from their module structure (``DISCOVERED``, built by ``lmedit.models.tiny`` with four layers).

A new editor joins automatically through ``list_editors()``. Each editor's ``quick`` class attribute gives
config overrides that make it fast on the tiny random models; an editor with ``capabilities.needs_fit`` is
fitted once per family (``fit(handle, cases, quick=True)``) and its state reused. A combination is skipped
only where the editor's capabilities say it cannot handle the architecture.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DISCOVERED, FAMILIES, make_handle, make_model
from lmedit.config import ConfigError
from lmedit.digests import tensor_digest
from lmedit.edits import Edit, EditError, EditMismatchError, PromptContext, WeightDelta
from lmedit.metrics.scoring import score_targets
from lmedit.models.handle import ModelHandle
from lmedit.registry import editor_class, get_editor, list_editors
from lmedit.types import QA, EditCase, EditRequest

EDITORS = list_editors()

REQ_A = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                    target_true="French", case_id="a")
REQ_B = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome", target_true="Paris",
                    case_id="b")
TOY_CASES = [
    EditCase(REQ_A, paraphrases=("Where Danielle Darrieux is from, people speak the language of",),
             locality=(QA("Michel Rocard is a native speaker of", "French"),)),
    EditCase(REQ_B, paraphrases=("The capital city of France is",),
             locality=(QA("The capital of Italy is", "Rome"),)),
    EditCase(EditRequest(prompt="{} was born in", subject="Barack Obama", target_new="Tokyo",
                         target_true="Hawaii", case_id="c"),
             paraphrases=("Barack Obama is originally from",), locality=(QA("Tokyo is in", "Japan"),)),
]


@pytest.fixture(scope="session")
def shared():
    """Per-family handle caches and fitted editor states, reused by tests on identical base models."""
    return {"caches": {}, "fitted": {}}


def setup(name: str, family: str, tokenizer, shared, dtype: torch.dtype | None = None):
    cls = editor_class(name)
    if family == "t5" and not cls.capabilities.encoder_decoder:
        pytest.skip(f"{name} declares capabilities.encoder_decoder=False: it cannot edit T5")
    model = make_model(family)
    if dtype is not None:
        model = model.to(dtype)
    handle = ModelHandle(model, tokenizer, name=f"tiny-{family}")
    handle.cache = shared["caches"].setdefault((family, str(dtype)), {})
    editor = get_editor(name, **cls.quick)
    if cls.capabilities.needs_fit:
        key = (name, family, str(dtype))
        if key in shared["fitted"]:
            editor.load_state_dict(shared["fitted"][key])
        else:
            editor.fit(handle, TOY_CASES, quick=True)
            shared["fitted"][key] = editor.state_dict()
    return editor, handle


def snapshot(handle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handle.model.state_dict().items()}


def assert_same_weights(handle, snap: dict[str, torch.Tensor]) -> None:
    now = handle.model.state_dict()
    assert set(now) == set(snap)
    changed = [k for k, v in now.items() if not torch.equal(v, snap[k])]
    assert not changed, f"parameters changed: {changed[:5]}"


def hook_count(handle) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules())


def logprob(handle, req: EditRequest) -> float:
    """Mean per-token log-probability of the new target on the edit prompt."""
    return -score_targets(handle, [req.text], [req.target_new])[0].nll


@torch.no_grad()
def logits(handle, reqs=(REQ_A, REQ_B)) -> torch.Tensor:
    batch = handle.tokens.teacher_forced([handle.render(r.text) for r in reqs], [r.target_new for r in reqs])
    return handle.logits(batch)


def other_model(family: str, tokenizer) -> ModelHandle:
    """Same architecture, other weights: an edit made for the tiny model must refuse it."""
    model = make_model(family)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    return ModelHandle(model, tokenizer, name=f"other-{family}")


params = pytest.mark.parametrize("family", FAMILIES + DISCOVERED)  # the table's families, then discovered ones
editors = pytest.mark.parametrize("name", EDITORS)


# (1) ---------------------------------------------------------------------------------------------------
@editors
@params
def test_compute_leaves_model_untouched(name, family, tokenizer, shared):
    editor, handle = setup(name, family, tokenizer, shared)
    snap, hooks = snapshot(handle), hook_count(handle)
    modules = [(n, type(m)) for n, m in handle.model.named_modules()]
    edit = editor.compute(handle, [REQ_A])
    assert isinstance(edit, editor.capabilities.edit_kind), "capabilities.edit_kind is not the kind it returns"
    assert_same_weights(handle, snap)
    assert handle.contexts == []
    assert hook_count(handle) == hooks, "compute left hooks on the model"
    assert [(n, type(m)) for n, m in handle.model.named_modules()] == modules, "compute left modules swapped"
    assert not any(p.requires_grad for p in handle.model.parameters())


# (2) ---------------------------------------------------------------------------------------------------
@editors
@params
def test_apply_raises_target_probability(name, family, tokenizer, shared):
    editor, handle = setup(name, family, tokenizer, shared)
    edit = editor.compute(handle, [REQ_A])
    before = logprob(handle, REQ_A)
    with edit.applied(handle):
        after = logprob(handle, REQ_A)
        rendered = handle.render(REQ_A.text)
    if isinstance(edit, PromptContext):
        # A random tiny model cannot read facts from its context, so the probability check of an in-context
        # edit runs on the real model (tests/unit/test_ike.py, slow). Here: the model reads the new fact.
        assert rendered.endswith(REQ_A.text) and REQ_A.target_new in rendered[: -len(REQ_A.text)]
        assert after != before
    else:
        assert after > before, f"log p(target) {before:.4f} -> {after:.4f}"


# Combinations whose edit moves a target by less than float rounding differs between CPUs. AlphaEdit on the tiny
# random GPT-J: its quick preset's null space holds ~1% of the keys' energy (benchmarks/alphaedit_capacity.py
# measures the same tension on SmolLM2), so the update barely reaches the edit keys and a target's log-prob moves
# by about 1e-3, up or down with the machine (-6e-4 on one, > 0 on the CI machine of stop 21).
TOO_WEAK_ON_TINY = {("alphaedit", "gptj"): "AlphaEdit moves the tiny GPT-J's targets by ~1e-3 (null space ~1% of "
                                            "key energy): the sign is machine rounding"}


@editors
@params
def test_batch_edit_raises_every_target(name, family, tokenizer, shared, request):
    if not editor_class(name).capabilities.batch:
        pytest.skip(f"{name} declares capabilities.batch=False")
    if (name, family) in TOO_WEAK_ON_TINY:
        request.applymarker(pytest.mark.xfail(reason=TOO_WEAK_ON_TINY[(name, family)], strict=False))
    editor, handle = setup(name, family, tokenizer, shared)
    snap = snapshot(handle)
    edit = editor.compute(handle, [REQ_A, REQ_B])
    assert_same_weights(handle, snap)
    before = [logprob(handle, r) for r in (REQ_A, REQ_B)]
    with edit.applied(handle):
        after = [logprob(handle, r) for r in (REQ_A, REQ_B)]
    if not isinstance(edit, PromptContext):
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


# (3) ---------------------------------------------------------------------------------------------------
@editors
@params
def test_revert_restores_weights_and_outputs(name, family, tokenizer, shared):
    editor, handle = setup(name, family, tokenizer, shared)
    snap, base_logits = snapshot(handle), logits(handle)
    edit = editor.compute(handle, [REQ_A]).apply(handle)
    assert not torch.equal(logits(handle), base_logits), "the applied edit changed nothing"
    edit.revert(handle)
    assert_same_weights(handle, snap)
    assert handle.contexts == []
    assert torch.equal(logits(handle), base_logits)


# (4) ---------------------------------------------------------------------------------------------------
@editors
@params
def test_save_load_roundtrip(name, family, tokenizer, shared, tmp_path):
    editor, handle = setup(name, family, tokenizer, shared)
    snap = snapshot(handle)
    edit = editor.compute(handle, [REQ_A])
    with edit.applied(handle):
        want = logits(handle)
    edit.save(tmp_path / "edit")
    loaded = Edit.load(tmp_path / "edit")
    assert type(loaded) is type(edit)
    json.dumps(loaded.meta)  # metadata stays JSON-serialisable
    with loaded.applied(handle):
        assert torch.equal(logits(handle), want)
    assert_same_weights(handle, snap)
    other = other_model(family, tokenizer)
    other_snap = snapshot(other)
    with pytest.raises(EditMismatchError):
        loaded.apply(other)
    assert_same_weights(other, other_snap)
    assert other.contexts == []


@editors
@params
def test_pure_editor_computes_the_same_edit_again(name, family, tokenizer, shared):
    """What an edit store relies on (lmedit.bench.stores): an editor with ``pure_compute`` gives the same edit
    for the same request on the same weights, whatever it computed in between."""
    editor, handle = setup(name, family, tokenizer, shared)
    if not editor.pure_compute:
        pytest.skip(f"{name} keeps state between computes (pure_compute=False); its edits are never stored")
    first = editor.compute(handle, [REQ_A])
    editor.compute(handle, [REQ_B])
    again = editor.compute(handle, [REQ_A])
    (t1, b1), (t2, b2) = first._to_state(), again._to_state()
    assert b1 == b2 and set(t1) == set(t2)
    assert all(torch.equal(t1[k], t2[k]) for k in t1), "the same request gave another edit"


# (5) ---------------------------------------------------------------------------------------------------
@editors
@params
def test_dtype_and_device_preserved(name, family, tokenizer, shared):
    """On a bfloat16 model: the edit computes, the model's own parameters keep dtype and device while it is
    applied (swapped-in modules may add parameters of their own), and the edited model still runs."""
    editor, handle = setup(name, family, tokenizer, shared, dtype=torch.bfloat16)
    own = [(p, p.dtype, p.device) for p in handle.model.parameters()]
    snap = snapshot(handle)
    edit = editor.compute(handle, [REQ_A])
    assert_same_weights(handle, snap)
    with edit.applied(handle):
        assert all(p.dtype == dt and p.device == dev for p, dt, dev in own)
        assert {p.device for p in handle.model.parameters()} == {handle.device}
        out = logits(handle)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_same_weights(handle, snap)


# (6) ---------------------------------------------------------------------------------------------------
@editors
def test_config_roundtrip_and_strictness(name, tokenizer, shared):
    cls = editor_class(name)
    handle = make_handle("llama", tokenizer)
    handle.cache = shared["caches"].setdefault(("llama", "None"), {})
    cfg = get_editor(name, **cls.quick).config_for(handle)
    assert cls.Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert get_editor(name, cfg).config_for(handle) == cfg
    for overrides in cls.presets.values():
        cls.Config.from_dict(overrides)  # every preset holds known keys of the right types
    with pytest.raises(ConfigError, match="unknown"):
        get_editor(name, no_such_option=1)
    for field, _tp, _default, help_text in cls.Config.describe_fields():
        assert help_text, f"{name} config field {field!r} has no help text"


# (7) ---------------------------------------------------------------------------------------------------
@editors
@params
def test_sequential_edits_revert_in_reverse(name, family, tokenizer, shared):
    if not editor_class(name).capabilities.sequential:
        pytest.skip(f"{name} declares capabilities.sequential=False")
    editor, handle = setup(name, family, tokenizer, shared)
    snap, base_logits = snapshot(handle), logits(handle)
    edit_a = editor.compute(handle, [REQ_A]).apply(handle)
    after_a = snapshot(handle)
    edit_b = editor.compute(handle, [REQ_B])
    assert_same_weights(handle, after_a)  # computing on an edited model leaves it as it was, too
    edit_b.apply(handle)
    with pytest.raises(EditError):
        edit_a.apply(handle)  # already applied
    edit_b.revert(handle)
    assert_same_weights(handle, after_a)
    edit_a.revert(handle)
    assert_same_weights(handle, snap)
    assert handle.contexts == []
    assert torch.equal(logits(handle), base_logits)


# (8) ---------------------------------------------------------------------------------------------------
def test_non_finite_edit_is_refused_and_model_unchanged(tokenizer):
    handle = make_handle("gpt2", tokenizer)
    snap = snapshot(handle)
    names = [n for n, _ in handle.model.named_parameters()][-4:]
    deltas = {n: torch.zeros_like(handle.model.get_parameter(n)) for n in names}
    deltas[names[-1]].view(-1)[3] = float("nan")  # the last entry fails after the others were checked
    edit = WeightDelta(deltas, base_digests={n: tensor_digest(handle.model.get_parameter(n)) for n in names},
                       meta={"model_fingerprint": handle.fingerprint})
    with pytest.raises(EditError, match="NaN"):
        edit.apply(handle)
    assert_same_weights(handle, snap)
    assert not edit.is_applied(handle)
    deltas[names[-1]].view(-1)[3] = float("inf")
    with pytest.raises(EditError):
        WeightDelta(deltas).apply(handle)
    assert_same_weights(handle, snap)
