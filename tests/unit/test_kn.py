"""KN: batched integrated gradients against a naive per-layer loop, neuron selection, the value-slot edit."""

from __future__ import annotations

import pytest
import torch

from conftest import make_handle
from lmedit import get_editor
from lmedit.edits import WeightDelta
from lmedit.hooks import get_parameter, trace
from lmedit.methods._ffn import UnsupportedFFNError, ffn_info
from lmedit.methods.kn import KN, KNConfig, attribute, select_neurons


def _naive_attribution(handle, layer: int, prompt: str, target_id: int, steps: int) -> torch.Tensor:
    """One full forward per α on the whole prompt, no KV cache: the textbook IG sum for one layer."""
    info = ffn_info(handle, layer)
    batch = handle.tokens.prompts([prompt])
    inputs = batch.model_inputs()
    if handle.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([[handle.tokens.decoder_start_id]])
    with torch.no_grad(), trace(handle.model, info.out, input=True, output=False) as t:
        handle.model(**inputs)
    a = t.input[0, -1].clone()  # [d_ff]
    total = torch.zeros_like(a)
    for alpha in torch.linspace(0, 1, steps):
        leaf = (alpha * a).requires_grad_(True)

        def put(x, leaf=leaf):
            x = x.clone()
            x[0, -1] = leaf
            return x

        with trace(handle.model, info.out, output=False, edit_input=put):
            logits = handle.model(**inputs).logits[0, -1]
        (g,) = torch.autograd.grad(torch.softmax(logits, -1)[target_id], leaf)
        total += g
    return a * total / steps


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj", "gpt_neox", "t5"])
def test_batched_attribution_matches_naive_loop(family, tokenizer):
    handle = make_handle(family, tokenizer)
    cfg = KNConfig(steps=5, layers_per_batch=2)
    infos = [ffn_info(handle, i) for i in range(handle.n_layers)]
    prompt = "The capital of France is"
    attr, _, t_ids, _ = attribute(handle, infos, prompt, "Paris", cfg)
    assert attr.shape == (handle.n_layers, infos[0].d_ff)
    attr = _first_token_attr(handle, infos, prompt, t_ids[0], cfg)  # the naive loop covers the first token
    for layer in range(handle.n_layers):
        ref = _naive_attribution(handle, layer, prompt, t_ids[0], 5)
        torch.testing.assert_close(attr[layer], ref, rtol=1e-3, atol=1e-7)
    # layers in any order and chunks of any size (a chunk replays the clean layers below its lowest layer)
    order = list(range(handle.n_layers))[::-1]
    order = order[1::2] + order[::2]  # e.g. 2, 0, 3, 1
    for per_batch in (1, 3):
        got = _first_token_attr(handle, [infos[i] for i in order], prompt, t_ids[0],
                                KNConfig(steps=5, layers_per_batch=per_batch))
        torch.testing.assert_close(got, attr[order], rtol=1e-4, atol=1e-8)


def _first_token_attr(handle, infos, prompt, target_id, cfg):
    from lmedit.methods.kn import _attribute_step, _Prefix

    return _attribute_step(handle, infos, _Prefix(handle, handle.tokens.prompt_ids(prompt), []), target_id, cfg).attr


def test_select_neurons_threshold_refinement_and_cap():
    a = torch.zeros(2, 6)
    a[0, 1], a[1, 3], a[1, 4], a[0, 5] = 1.0, 0.5, 0.1, 0.3
    b = torch.zeros(2, 6)
    b[0, 1], b[1, 3], b[0, 5] = 0.8, 0.9, 0.05
    cfg = KNConfig(adaptive_threshold=0.2, refine_share=0.5, max_neurons=10)
    chosen = {(r, i) for r, i, _ in select_neurons([a, b], cfg)}
    assert chosen == {(0, 1), (1, 3)}  # (1,4) below threshold; (0,5) only in one of two prompts
    top1 = select_neurons([a, b], KNConfig(refine_share=0.5, max_neurons=1))
    assert [(r, i) for r, i, _ in top1] == [(0, 1)]


def test_edit_is_rank_one_on_selected_columns_only(tiny_llama, request_darrieux):
    edit = get_editor("kn", **KN.quick).compute(tiny_llama, request_darrieux)
    assert isinstance(edit, WeightDelta)
    neurons = edit.meta["stats"]["neurons"]
    assert 1 <= len(neurons) <= KN.quick["max_neurons"]
    for name in edit.deltas:
        a, b = edit.deltas[name]
        assert a.shape[1] == b.shape[1] == 1
        dense = edit.dense(name)
        assert dense.shape == get_parameter(tiny_llama.model, name).shape
        layer = next(int(p) for p in name.split(".") if p.isdigit())
        cols = {i for ell, i, _ in neurons if ell == layer}
        touched = {int(j) for j in torch.nonzero(dense.abs().sum(0)).flatten()}
        assert touched == cols


def test_conv1d_layout_touches_rows(tokenizer, request_darrieux):
    handle = make_handle("gpt2", tokenizer)  # Conv1D stores [d_ff, d]: a neuron's value slot is a row
    edit = get_editor("kn", **KN.quick).compute(handle, request_darrieux)
    for name in edit.deltas:
        dense = edit.dense(name)
        layer = next(int(p) for p in name.split(".") if p.isdigit())
        rows = {i for ell, i, _ in edit.meta["stats"]["neurons"] if ell == layer}
        assert {int(j) for j in torch.nonzero(dense.abs().sum(1)).flatten()} == rows


def test_value_update_is_embedding_difference(tiny_llama, request_darrieux):
    cfg = {**KN.quick, "embedding": "input", "activation_sign": False, "edit_scale": 2.0, "erase_old": True}
    edit = get_editor("kn", **cfg).compute(tiny_llama, request_darrieux)
    st = edit.meta["stats"]
    emb = tiny_llama.model.get_input_embeddings().weight.float()
    want = 2.0 * (emb[st["target_ids"]].sum(0) - emb[st["old_answer_ids"]].sum(0))
    ell, i, _ = st["neurons"][0]
    name = f"model.layers.{ell}.mlp.down_proj.weight"
    torch.testing.assert_close(edit.dense(name)[:, i], want)


def test_bad_layers_and_unrecognised_ffn(tiny_llama, request_darrieux):
    with pytest.raises(ValueError, match="out of range"):
        get_editor("kn", layers=[99]).compute(tiny_llama, request_darrieux)
    bad = tiny_llama.adapter.replace(mlp_out="model.layers.{}.mlp.act_fn")
    tiny_llama.adapter = bad
    with pytest.raises(UnsupportedFFNError, match="no 2-D weight"):
        get_editor("kn").compute(tiny_llama, request_darrieux)
