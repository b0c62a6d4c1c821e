"""KE: the mask formula, the Lagrange multiplier's ascent, and the trained editor on tiny models."""

from __future__ import annotations

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
