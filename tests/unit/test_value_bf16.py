"""bfloat16 matrix products in the value optimisation (lmedit.locate.lowp, ``v_matmuls="bf16"``): the model
is never written and always restored, the values match float32's, and a value stops only once the model's
own precision confirms its loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmedit.config import ConfigError
from lmedit.kv import body_and_head
from lmedit.locate import values as V
from lmedit.locate.lowp import low_precision
from lmedit.locate.pipeline import LocateConfig, value_options
from lmedit.types import EditRequest

REQ = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")


def _ids(handle) -> dict:
    return handle.tokenizer("The mother tongue of Danielle Darrieux is", return_tensors="pt")


def _patched(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def test_bf16_linears_round_the_products_and_leave_the_model_as_it_was(tiny_llama):
    model = tiny_llama.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**_ids(tiny_llama)).logits
        lp = low_precision(tiny_llama, 1, body_and_head(model)[1], "bf16")
        assert lp is not None and len(lp.modules) == 3 * 7 + 1  # layers 1-3 (q k v o gate up down) and the head
        with lp:
            assert len(_patched(model)) == len(lp.modules)
            low = model(**_ids(tiny_llama)).logits
            lp.enabled = False
            same = model(**_ids(tiny_llama)).logits
        after = model(**_ids(tiny_llama)).logits
    assert not torch.equal(low, ref) and torch.allclose(low, ref, rtol=0.05, atol=0.05)
    assert torch.equal(same, ref) and torch.equal(after, ref)
    assert _patched(model) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bf16_linears_are_removed_when_the_pass_fails(tiny_llama):
    lp = low_precision(tiny_llama, 0, None, "bf16")
    with pytest.raises(RuntimeError, match="boom"), lp:
        assert _patched(tiny_llama.model)
        raise RuntimeError("boom")
    assert _patched(tiny_llama.model) == []


def test_low_precision_has_nothing_to_do_for_model_matmuls_and_refuses_unknown_names(tiny_llama):
    assert low_precision(tiny_llama, 1, None, "model") is None
    with pytest.raises(ValueError, match="bf16"):
        low_precision(tiny_llama, 1, None, "fp8")


def test_bf16_values_match_float32_values(tiny_llama):
    groups = [["{}"], ["A {}", "The {}"]]
    base = V.ValueOptions(steps=40, lr=0.5, weight_decay=0.0, clamp=50.0, early_stop=0.0, optimizer="lbfgs")
    full = V.optimize_value(tiny_llama, REQ, 1, ["mlp"], groups, base)
    stop = full.losses[0] - 0.8 * (full.losses[0] - min(full.losses))  # 80% of the whole decrease
    opts = V.ValueOptions(**{**base.__dict__, "early_stop": stop})
    f32 = V.optimize_value(tiny_llama, REQ, 1, ["mlp"], groups, opts)
    b16 = V.optimize_value(tiny_llama, REQ, 1, ["mlp"], groups, V.ValueOptions(**{**opts.__dict__,
                                                                                  "matmuls": "bf16"}))
    assert f32.losses[-1] < stop and b16.losses[-1] < stop < b16.losses[0]
    assert abs(len(f32.losses) - len(b16.losses)) <= 3
    d32, d16 = f32.delta["mlp"], b16.delta["mlp"]
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.98
    assert torch.equal(f32.init["mlp"], b16.init["mlp"])  # v₀ comes from the model's own precision
    assert _patched(tiny_llama.model) == []


def test_a_value_stops_only_when_the_model_precision_confirms_its_loss(tiny_llama, monkeypatch):
    """Low-precision passes here always claim a loss far below the stop; the true loss never gets there. Each
    claim is checked by a pass on the model's own weights, so the value never stops on a claim (11 steps: the
    last pass is a precise one; a claim on the very last step would stand, there being no pass left)."""
    made, passes = [], []
    real_low, real_losses = V.low_precision, V._losses

    def spy(*a, **k):
        made.append(real_low(*a, **k))
        return made[-1]

    def claimed(p, logits, kl, sites, opts):
        loss, confident = real_losses(p, logits, kl, sites, opts)
        low = bool(made) and made[0].enabled and len(passes) > 0  # pass 0: the suffix check, model precision
        passes.append(low)
        return (loss - 100.0 if low else loss), confident

    monkeypatch.setattr(V, "low_precision", spy)
    monkeypatch.setattr(V, "_losses", claimed)
    opts = V.ValueOptions(steps=11, lr=0.5, weight_decay=0.0, clamp=50.0, early_stop=1e-6, matmuls="bf16")
    res = V.optimize_value(tiny_llama, REQ, 1, ["mlp"], [["{}"]], opts)
    assert any(passes) and not all(passes)
    assert passes[1::2] == [True] * len(passes[1::2])  # every claim was followed by a precise pass
    assert passes[2::2] == [False] * len(passes[2::2])
    assert min(res.losses) > 0  # nothing recorded from a claim, and no stop on one
    assert len(passes) == 11


def test_v_matmuls_reaches_the_value_options_and_keeps_old_hashes():
    plain, bf16 = LocateConfig(), LocateConfig(v_matmuls="bf16")
    assert value_options(plain).matmuls == "model" and value_options(bf16).matmuls == "bf16"
    old = {k: v for k, v in plain.to_dict().items() if k != "v_matmuls"}
    assert plain.hash() == LocateConfig.from_dict(old).hash()  # added=True: cached cells keep their hash
    assert bf16.hash() != plain.hash()
    with pytest.raises(ConfigError, match="v_matmuls"):
        LocateConfig(v_matmuls="fp16")


def test_bf16_values_have_their_own_value_cache_scope_and_old_scopes_stay(tiny_llama):
    from lmedit.locate.value_store import ValueStore

    plain = ValueStore.scope(tiny_llama, 1, ["mlp"], V.ValueOptions(), [["{}"]])
    bf16 = ValueStore.scope(tiny_llama, 1, ["mlp"], V.ValueOptions(matmuls="bf16"), [["{}"]])
    assert plain != bf16
    assert "matmuls" not in str(plain)  # values cached before the option existed keep their folder
