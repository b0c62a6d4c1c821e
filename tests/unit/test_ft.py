"""FT-L / FT-M: objectives against naive formulas, constraint, layouts, lower-layer replay, failure safety."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_handle
from lmedit.config import ConfigError
from lmedit.edits import WeightDelta
from lmedit.methods import ft
from lmedit.registry import get_editor
from lmedit.types import EditRequest

REQS = [
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
    EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome"),
]


def _leaves(handle, layers, scale=0.0):
    trained = ft._make_leaves(handle, layers)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in trained:
            t.dw.add_(scale * torch.randn(t.dw.shape, generator=gen))
            if t.db is not None:
                t.db.add_(scale * torch.randn(t.db.shape, generator=gen))
    return trained


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_hooked_forward_equals_model_with_updated_weights(family, tokenizer):
    """W0 x + ΔW x + Δb (training) == (W0 + ΔW) x (applied edit), incl. GPT-2's transposed Conv1D layout."""
    handle = make_handle(family, tokenizer)
    trained = _leaves(handle, [1], scale=0.05)
    batch = handle.tokens.teacher_forced([r.text for r in REQS], [r.target_new for r in REQS])
    with torch.no_grad(), ft._delta_hooks(handle, trained):
        hooked = handle.logits(batch)
    deltas = {t.weight_name: handle.adapter.to_param_layout(t.dw.detach()) for t in trained}
    deltas.update({t.bias_name: t.db.detach() for t in trained if t.db is not None})
    assert (family == "gpt2") == any(name.endswith(".bias") for name in deltas)
    with WeightDelta(deltas).applied(handle), torch.no_grad():
        applied = handle.logits(batch)
    torch.testing.assert_close(hooked, applied, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_objectives_match_naive_formulas(family, tokenizer):
    handle = make_handle(family, tokenizer)
    batch = handle.tokens.teacher_forced([r.text for r in REQS], [r.target_new for r in REQS])
    with torch.no_grad():
        logp = F.log_softmax(handle.logits(batch).float(), -1)  # [batch, seq, vocab]
        fm = ft._objective_loss(handle, batch, "target_new")
        fl = ft._objective_loss(handle, batch, "prompt_last")
    want_m, want_l = [], []
    for i, labels in enumerate(batch.labels):
        pos = batch.pred_positions(i)
        want_m.append(-torch.stack([logp[i, p, y] for p, y in zip(pos, labels, strict=True)]).mean())
        want_l.append(-torch.stack([logp[i, pos[0], y] for y in labels]).mean())
    torch.testing.assert_close(fm, torch.stack(want_m).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fl, torch.stack(want_l).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "t5"])
def test_lower_layer_replay_gives_the_same_edit(family, tokenizer):
    handle = make_handle(family, tokenizer)
    kw = dict(layers=[2 if family != "t5" else 1], steps=4, lr=1e-2)
    fast = get_editor("ft-m", cache_lower=True, **kw).compute(handle, REQS)
    slow = get_editor("ft-m", cache_lower=False, **kw).compute(handle, REQS)
    assert fast.deltas.keys() == slow.deltas.keys()
    for name in fast.deltas:
        torch.testing.assert_close(fast.deltas[name], slow.deltas[name], rtol=1e-4, atol=1e-7)
    assert fast.meta["stats"]["losses"] == pytest.approx(slow.meta["stats"]["losses"], rel=1e-5)


def test_ft_l_respects_the_linf_constraint(tokenizer):
    handle = make_handle("gpt2", tokenizer)
    edit = get_editor("ft-l", layers=[1, 3], steps=5, lr=1e-2, norm_constraint=1e-3).compute(handle, REQS)
    assert len(edit.deltas) == 4  # weight and bias of two layers
    for d in edit.deltas.values():
        assert d.abs().max() <= 1e-3 + 1e-9
        assert d.abs().max() > 0
    stats = edit.meta["stats"]
    assert stats["objective"] == "prompt_last" and stats["layers"] == [1, 3]
    assert set(stats["relative_norm"]) == {k for k in edit.deltas if k.endswith("weight")}  # zero biases skipped


def test_weight_decay_pulls_weights_toward_zero(tokenizer):
    handle = make_handle("llama", tokenizer)
    name = handle.adapter.mlp_out.format(2) + ".weight"
    w0 = handle.model.get_parameter(name).detach()
    kw = dict(layers=[2], steps=5, lr=1e-3, early_stop_loss=0.0)
    plain = get_editor("ft-m", **kw).compute(handle, REQS[:1]).deltas[name]
    decayed = get_editor("ft-m", weight_decay=1e4, **kw).compute(handle, REQS[:1]).deltas[name]
    assert (w0 + decayed).norm() < w0.norm() < (w0 + plain).norm()


def test_early_stop_skips_steps_below_the_loss_threshold(tokenizer):
    handle = make_handle("llama", tokenizer)
    edit = get_editor("ft-m", steps=10, early_stop_loss=1e3).compute(handle, REQS)
    assert edit.meta["stats"]["steps_run"] == 1
    assert all(torch.count_nonzero(d) == 0 for d in edit.deltas.values())


def test_chunks_and_default_layer(tokenizer, caplog):
    handle = make_handle("gptj", tokenizer)
    with caplog.at_level("INFO", logger="lmedit.methods.ft"):
        edit = get_editor("ft-m", steps=3, batch_size=1).compute(handle, REQS)
    assert edit.meta["config"]["layers"] == [2]  # round(0.65 * 3) of 4 layers
    assert "no layers given" in caplog.text
    assert len(edit.meta["stats"]["losses"]) == 3


def test_presets_and_defaults():
    assert ft.FTL.presets["smollm2-135m"] == {"layers": [19], "lr": 5e-4, "steps": 25, "norm_constraint": None}
    assert ft.FTM.presets["smollm2-135m"]["norm_constraint"] is None
    assert ft.FTLConfig().norm_constraint == 5e-4 and ft.FTConfig().norm_constraint is None
    assert ft.FTL.capabilities.batch and ft.FTM.capabilities.sequential


@pytest.mark.parametrize("bad", [{"layers": []}, {"lr": 0}, {"steps": 0}, {"norm_constraint": -1.0},
                                 {"weight_decay": -1}])
def test_bad_config_is_refused(bad):
    with pytest.raises(ConfigError):
        get_editor("ft-m", **bad)


def test_layer_out_of_range(tokenizer):
    handle = make_handle("llama", tokenizer)
    with pytest.raises(ValueError, match="out of range"):
        get_editor("ft-m", layers=[7]).compute(handle, REQS)


def test_failure_mid_training_leaves_the_model_intact(tokenizer, monkeypatch):
    handle = make_handle("llama", tokenizer)
    layers = dict(handle.model.named_modules())
    snap = {k: v.clone() for k, v in handle.model.state_dict().items()}
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    real = ft._objective_loss
    monkeypatch.setattr(ft, "_objective_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        get_editor("ft-m", layers=[3], steps=3).compute(handle, REQS)
    assert dict(handle.model.named_modules()).keys() == layers.keys()
    assert all(a is b for a, b in zip(dict(handle.model.named_modules()).values(), layers.values(), strict=True))
    assert all(torch.equal(v, snap[k]) for k, v in handle.model.state_dict().items())
    assert sum(len(m._forward_hooks) for m in handle.model.modules()) == 0
