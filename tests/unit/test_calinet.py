"""CaliNet: the calibration FFN is inert until trained, matches the model's FFN family, and edits in batches."""

from __future__ import annotations

import pytest
import torch

from conftest import make_handle
from lmedit import get_editor
from lmedit.edits import Edit, ModuleSwap
from lmedit.methods._ffn import answer_batch, ffn_info, frozen_prefix
from lmedit.methods.calinet import CalibratedFFN, CaliNet
from lmedit.metrics.scoring import score_targets
from lmedit.types import EditRequest

FRANCE = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome")


def _logprob(handle, req):
    return sum(score_targets(handle, [req.text], [req.target_new])[0].logprobs)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_untrained_calibration_changes_nothing(family, tokenizer, request_darrieux):
    handle = make_handle(family, tokenizer)
    info = ffn_info(handle, handle.n_layers - 1)
    before = score_targets(handle, [request_darrieux.text], ["English"])[0]
    swap = ModuleSwap({info.mlp: CalibratedFFN(info.d_model, 8, info.activation, info.gated)})
    with swap.applied(handle):
        assert score_targets(handle, [request_darrieux.text], ["English"])[0] == before


def test_side_ffn_follows_model_ffn_family(tokenizer):
    llama, gpt2 = make_handle("llama", tokenizer), make_handle("gpt2", tokenizer)
    assert ffn_info(llama, 0).gated and ffn_info(llama, 0).activation == "silu"
    assert not ffn_info(gpt2, 0).gated
    g = CalibratedFFN(32, 4, "silu", True)
    assert g.side.w_up is not None and g.side.w_out.abs().sum() == 0
    assert CalibratedFFN(32, 4, "gelu_new", False).side.w_up is None


def test_frozen_prefix_replays_exactly(tiny):
    ab = answer_batch(tiny, [FRANCE.text, "The mother tongue of Danielle Darrieux is"], ["Rome", "English"])
    ref = tiny.model(**ab.inputs, use_cache=False).logits
    with frozen_prefix(tiny, tiny.n_layers - 1, ab.inputs):
        assert torch.equal(tiny.model(**ab.inputs, use_cache=False).logits, ref)
    assert torch.equal(tiny.model(**ab.inputs, use_cache=False).logits, ref)  # stand-ins removed


def test_batch_edit_raises_both_targets_and_saves_only_own_weights(tiny_llama, request_darrieux, tmp_path):
    reqs = [request_darrieux, FRANCE]
    digest = tiny_llama.state_digest()
    before = [_logprob(tiny_llama, r) for r in reqs]
    edit = get_editor("calinet", **CaliNet.quick).compute(tiny_llama, reqs)
    assert tiny_llama.state_digest() == digest
    assert edit.meta["stats"]["layers"] == [2, 3]  # default: the last two layers
    with edit.applied(tiny_llama):
        after = [_logprob(tiny_llama, r) for r in reqs]
    assert all(a > b for a, b in zip(after, before, strict=True))
    loaded = Edit.load(edit.save(tmp_path / "e"))
    tensors, _ = loaded._to_state()
    assert tensors and not any(".base." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == 2 * 3 * 32 * CaliNet.quick["width"]
    with loaded.applied(tiny_llama):
        assert [_logprob(tiny_llama, r) for r in reqs] == pytest.approx(after)


def test_bad_layer_is_a_clear_error(tiny_llama, request_darrieux):
    with pytest.raises(ValueError, match="out of range"):
        get_editor("calinet", layers=[7]).compute(tiny_llama, request_darrieux)
