"""KE: the mask formula, the Lagrange multiplier's ascent, and the trained editor on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from test_mend import CASES, REQ

from conftest import make_handle
from lmedit.methods.ke import KEConfig, KEObjective, MaskHead
from lmedit.metrics.scoring import score_targets
from lmedit.registry import get_editor


def test_mask_head_is_the_papers_formula():
    torch.manual_seed(0)
    head = MaskHead(cond_dim=6, hidden=5, m=4, n=3, init_col=0.0)
    with torch.no_grad():
        head.out.weight.normal_()
    c, g = torch.randn(6), torch.randn(4, 3)
    o = head.out(torch.tanh(head.inp(c)))
    a_row, a_col, b_row, b_col, eta = o[:4], o[4:7], o[7:11], o[11:14], o[14]
    alpha = torch.outer(torch.softmax(a_row, 0), a_col)
    beta = torch.outer(torch.softmax(b_row, 0), b_col)
    want = 2.0 * torch.sigmoid(eta) * (alpha * g + beta)
    assert torch.allclose(head(c, g, max_scale=2.0), want, atol=1e-6)


def test_initial_update_is_a_descent_step_and_lambda_ascends(tokenizer):
    handle = make_handle("llama", tokenizer)
    cfg = get_editor("ke", **get_editor("ke").quick).config_for(handle)
    cfg = cfg.replace(layers=[handle.n_layers - 1])
    obj = KEObjective(handle, cfg)
    deltas, _ = obj.deltas([REQ])
    from lmedit.training.functional import capture_grads

    factors, *_ = capture_grads(handle, obj.paths, [REQ.text], [REQ.target_new])
    for p, dw in deltas.items():
        u, d = factors[p]
        assert float((dw.detach() * (d.T @ u)).sum()) < 0  # ΔW points against the gradient
    from lmedit.training.data import examples_from_cases

    loss, metrics = obj.train_step(examples_from_cases(CASES[:2]))
    loss.backward()
    # the optimiser descends; a negated gradient makes it raise λ while the KL exceeds the margin
    assert (obj.net.log_lambda.grad < 0) == (metrics["loc_kl"] > cfg.kl_margin)


@pytest.mark.parametrize("family", ["gpt_neox", "t5"])
def test_trained_ke_raises_the_target(family, tokenizer):
    handle = make_handle(family, tokenizer)
    editor = get_editor("ke", **get_editor("ke").quick)
    editor.fit(handle, CASES, quick=True)
    before = score_targets(handle, [REQ.text], [REQ.target_new])[0].nll
    edit = editor.compute(handle, [REQ])
    with edit.applied(handle):
        after = score_targets(handle, [REQ.text], [REQ.target_new])[0].nll
    assert after < before
    assert all(v > 0 for v in edit.meta["stats"]["relative_norm"].values())


def test_ke_config_is_strict():
    with pytest.raises(Exception, match="unknown"):
        KEConfig.from_dict({"cond_size": 3})


def _objective(tokenizer, **overrides):
    handle = make_handle("llama", tokenizer)
    cfg = get_editor("ke", **get_editor("ke").quick).config_for(handle)
    return KEObjective(handle, cfg.replace(layers=[handle.n_layers - 1], **overrides))


def _ascend(obj, steps: int) -> list[float]:
    """λ after each of ``steps`` optimiser steps on the multiplier alone (Adam, as the trainer)."""
    from lmedit.training.data import examples_from_cases

    groups = obj.param_groups()
    opt = torch.optim.Adam([groups[1]])
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = obj.train_step(examples_from_cases(CASES[:2]))
        loss.backward()
        opt.step()
        obj.after_step()
        out.append(float(obj.net.lam().detach()))
    return out


def test_linear_multiplier_rises_by_about_lr_alpha_per_step_as_in_kes_code(tokenizer):
    """KE's code keeps λ itself: while the KL is over the margin it rises ~lr_alpha per step. The log form
    multiplies it by ~e^lr_alpha per step instead (lmedit's first KE, still the default for its checkpoints)."""
    lin = _objective(tokenizer, multiplier="linear", kl_margin=0.0, lr_alpha=0.5)
    assert lin.param_groups()[1]["clip"] is False and lin.param_groups()[1]["params"] == [lin.net.lambda_kl]
    assert not hasattr(lin.net, "log_lambda")
    lams = _ascend(lin, 4)
    steps = [b - a for a, b in zip([1.0] + lams[:-1], lams, strict=True)]
    assert all(0 < d <= 0.5 * 1.01 for d in steps), steps  # additive, at most lr_alpha per step
    log = _objective(tokenizer, kl_margin=0.0, lr_alpha=0.5)
    assert log.param_groups()[1]["clip"] is True
    log_lams = _ascend(log, 4)
    ratios = [b / a for a, b in zip([1.0] + log_lams[:-1], log_lams, strict=True)]
    assert all(r > 1.5 for r in ratios), ratios  # multiplicative: ~e^0.5 per step
    assert lams[-1] == pytest.approx(1 + 4 * 0.5, rel=0.02)  # Adam's steps are lr_alpha long at first
    assert log_lams[-1] == pytest.approx(math.exp(4 * 0.5), rel=0.1)


def test_linear_multiplier_is_clamped_at_zero(tokenizer):
    """With the KL under the margin, ascent lowers λ; it stops at 0 (KE's code clamps it there)."""
    obj = _objective(tokenizer, multiplier="linear", kl_margin=1e9, lr_alpha=1.0)
    lams = _ascend(obj, 3)
    assert lams[-1] == 0.0 and min(lams) >= 0.0


def test_linear_multiplier_checkpoints_round_trip(tokenizer):
    obj = _objective(tokenizer, multiplier="linear")
    state = obj.state_tensors()
    assert "lambda_kl" in state and "log_lambda" not in state
    other = _objective(tokenizer, multiplier="linear")
    with torch.no_grad():
        state["lambda_kl"] = torch.tensor(3.5)
    other.load_state_tensors(state)
    assert float(other.net.lam().detach()) == 3.5
