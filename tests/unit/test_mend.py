"""MEND pieces against naive formulas, and the trained editor end to end on tiny models."""

from __future__ import annotations

import pytest
import torch

from conftest import make_handle
from lmedit.hooks import get_module
from lmedit.methods.mend.network import MENDNet, RunningNorm
from lmedit.registry import get_editor
from lmedit.training import CheckpointError
from lmedit.training.functional import capture_grads, delta_hooks, edited_paths
from lmedit.types import QA, EditCase, EditRequest

REQ = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English", case_id=0)
CASES = [
    EditCase(REQ, paraphrases=("Where Danielle Darrieux is from, people speak the language of",),
             locality=(QA("Michel Rocard is a native speaker of", "French"),)),
    EditCase(EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome", case_id=1),
             paraphrases=("The capital city of France is",), locality=(QA("Tokyo is in", "Japan"),)),
    EditCase(EditRequest(prompt="{} was born in", subject="Barack Obama", target_new="Tokyo", case_id=2),
             paraphrases=("Barack Obama is originally from",), locality=(QA("The capital of Italy is", "Rome"),)),
]


def test_running_norm_matches_batch_statistics():
    torch.manual_seed(0)
    x = torch.randn(50, 6) * 3 + 1
    norm = RunningNorm(6)
    for chunk in x.split([7, 20, 1, 22]):
        norm.update(chunk)
    assert torch.allclose(norm.mean.float(), x.mean(0), atol=1e-5)
    assert torch.allclose((norm.m2 / (norm.count - 1)).float(), x.var(0), atol=1e-4)
    z = norm(x)
    assert torch.allclose(z.mean(0), torch.zeros(6), atol=1e-5)
    assert RunningNorm(3)(torch.ones(2, 3)).equal(torch.ones(2, 3))  # identity before 2 samples


def test_editor_network_starts_as_a_scaled_gradient_step():
    torch.manual_seed(0)
    net = MENDNet({"a": (5, 3), "b": (5, 3), "c": (4, 3)}, rank=8, edit_lr=0.1)
    assert len(net.nets) == 2  # shared by same-shaped matrices
    u, d = torch.randn(7, 3), torch.randn(7, 5)
    a, b = net("a", u, d)
    assert torch.allclose(a @ b.T, -0.1 * d.T @ u, atol=1e-6)  # ΔW = −α Σ δ uᵀ at initialisation


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_captured_factors_give_the_weight_gradient(family, tokenizer):
    handle = make_handle(family, tokenizer)
    paths = edited_paths(handle, [handle.n_layers - 1], "both")
    factors, loss, _, rows = capture_grads(handle, paths, [REQ.text, "Tokyo is in"], ["English", "Japan"])
    for p in paths:
        w = get_module(handle.model, p).weight
        w.requires_grad_(True)
        try:
            from lmedit.training.functional import answer_logprobs, nll_and_acc

            logp, labels, r = answer_logprobs(handle, [REQ.text, "Tokyo is in"], ["English", "Japan"])
            nll, _ = nll_and_acc(logp, labels, r)
            (g,) = torch.autograd.grad(nll * 2, w)
        finally:
            w.requires_grad_(False)
        u, d = factors[p]
        mine = handle.adapter.to_param_layout(d.T @ u)
        assert torch.allclose(mine, g, atol=1e-5 * g.abs().max()), p
    assert set(rows.tolist()) == {0, 1}


def test_delta_hooks_equal_applying_the_weight_delta(tokenizer):
    handle = make_handle("gpt2", tokenizer)  # Conv1D: the [in, out] layout
    path = handle.adapter.mlp_out.format(2)
    d_out, d_in = handle.adapter.weight_out_in(get_module(handle.model, path)).shape
    a, b = torch.randn(d_out, 3) * 0.1, torch.randn(d_in, 3) * 0.1
    batch = handle.tokens.teacher_forced([REQ.text], ["English"])
    with torch.no_grad(), delta_hooks(handle, {path: (a, b)}):
        hooked = handle.logits(batch)
    w = get_module(handle.model, path).weight
    with torch.no_grad():
        w += handle.adapter.to_param_layout(a @ b.T)
        direct = handle.logits(batch)
        w -= handle.adapter.to_param_layout(a @ b.T)
    assert torch.allclose(hooked, direct, atol=1e-5)


def test_fit_save_load_and_refusals(tokenizer, tmp_path):
    handle = make_handle("llama", tokenizer)
    editor = get_editor("mend", **get_editor("mend").quick)
    res = editor.fit(handle, CASES, quick=True, out=tmp_path)
    assert res.steps_done == 8 and "val_edit_acc" in res.history[-1]
    edit = editor.compute(handle, [REQ])
    assert edit.meta["stats"]["relative_norm"]
    loaded = get_editor("mend", checkpoint=str(tmp_path))
    again = loaded.compute(handle, [REQ])
    for name in edit.deltas:
        assert torch.allclose(edit.dense(name), again.dense(name))
    other = make_handle("gpt2", tokenizer)
    with pytest.raises(CheckpointError, match="trained on model 'tiny-llama'"):
        loaded.compute(other, [REQ])
    with pytest.raises(CheckpointError, match="method 'mend', not 'ke'"):
        get_editor("ke", checkpoint=str(tmp_path)).compute(handle, [REQ])
    from lmedit.training import checkpoint as ckpt

    path = ckpt.tensor_file(tmp_path, ckpt.EDITOR)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        get_editor("mend", checkpoint=str(tmp_path)).compute(handle, [REQ])


def test_batch_edit_sums_the_requests(tokenizer):
    handle = make_handle("gptj", tokenizer)
    editor = get_editor("mend", **get_editor("mend").quick)
    editor.fit(handle, CASES, quick=True)
    both = editor.compute(handle, [c.request for c in CASES[:2]])
    one = editor.compute(handle, [CASES[0].request])
    name = next(iter(both.deltas))
    assert both.deltas[name][0].shape[1] > one.deltas[name][0].shape[1]  # rank grows with the tokens edited
