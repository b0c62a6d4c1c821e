"""The value optimisation's optimisers (lmedit.locate.steppers): L-BFGS with its one-forward line search against
Adam, on a known function and on the tiny models' value loss."""

from __future__ import annotations

import pytest
import torch

from lmedit.locate import values as V
from lmedit.locate.pipeline import LocateConfig, value_options
from lmedit.locate.steppers import AdamStepper, LBFGSStepper, make_stepper
from lmedit.registry import editor_class, get_editor
from lmedit.types import EditRequest

REQ = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
MORE = [REQ, EditRequest(prompt="{} was born in", subject="I", target_new="the city of Paris"),
        EditRequest(prompt="{} plays the", subject="Tom", target_new="violin")]


def _evaluations_to(stepper_cls, f, x0: torch.Tensor, threshold: float, limit: int = 500, **kw) -> int:
    """Evaluations of ``f`` until it is below ``threshold``, driving the stepper the way values.py does."""
    x = x0.clone().requires_grad_(True)
    st = stepper_cls([x], **kw)
    for n in range(1, limit + 1):
        loss = f(x)
        if float(loss) < threshold:
            return n
        if st.evaluated(float(loss)):
            st.zero_grad()
            loss.backward()
        st.step()
    return limit + 1


def test_lbfgs_needs_far_fewer_evaluations_than_adam_on_an_ill_conditioned_quadratic():
    torch.manual_seed(0)
    scales = torch.logspace(0, 2, 50)  # condition number 100
    target = torch.randn(50)

    def f(x):
        return 0.5 * (scales * (x - target) ** 2).sum()

    x0 = torch.zeros(50)
    lbfgs = _evaluations_to(LBFGSStepper, f, x0, 1e-3, lr=0.5)
    adam = _evaluations_to(AdamStepper, f, x0, 1e-3, lr=0.5)
    assert lbfgs < 60
    assert lbfgs * 3 < adam


def test_lbfgs_line_search_rejects_a_step_that_raises_the_loss():
    x = torch.zeros(2, requires_grad=True)
    st = LBFGSStepper([x], lr=100.0)  # a first step far too long for f
    f = lambda x: ((x - 1) ** 2).sum()  # noqa: E731
    loss = f(x)
    assert st.evaluated(float(loss))
    loss.backward()
    st.step()
    far = x.detach().clone()
    assert float(f(far)) > float(loss)
    assert not st.evaluated(float(f(x)))  # rejected: no gradient needed, the loss kept is f(0)
    assert st.loss == float(loss)
    st.step()
    assert x.detach().norm() < far.norm()  # a shorter step along the same direction
    st.finish()  # the last trial was rejected: back to the accepted point
    assert torch.equal(x.detach(), torch.zeros(2))


def test_unknown_optimizer_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="adam"):
        make_stepper("sgd", [torch.zeros(2, requires_grad=True)], 0.1)


def test_lbfgs_reaches_the_early_stop_loss_in_fewer_steps_and_raises_the_target_probability(tiny_llama):
    base = V.ValueOptions(steps=60, lr=0.5, weight_decay=0.0, clamp=50.0, early_stop=0.0)
    adam = V.optimize_value(tiny_llama, REQ, 1, ["mlp"], [["{}"]], base)
    threshold = adam.losses[0] - 0.9 * (adam.losses[0] - min(adam.losses))  # 90% of Adam's whole decrease
    opts = V.ValueOptions(steps=60, lr=0.5, weight_decay=0.0, clamp=50.0, early_stop=threshold)
    a = V.optimize_value(tiny_llama, REQ, 1, ["mlp"], [["{}"]], opts)
    lb = V.optimize_value(tiny_llama, REQ, 1, ["mlp"], [["{}"]], V.ValueOptions(**{**opts.__dict__,
                                                                                   "optimizer": "lbfgs"}))
    assert lb.losses[-1] < threshold <= lb.losses[0]
    assert len(lb.losses) < len(a.losses)
    assert all(x >= y for x, y in zip(lb.losses, lb.losses[1:], strict=False))  # the kept δ never gets worse
    assert lb.delta["mlp"].norm() <= 50.0 * lb.init["mlp"].norm() * (1 + 1e-5)


def test_lbfgs_values_optimised_together_equal_values_optimised_alone(tiny_llama):
    opts = V.ValueOptions(steps=25, lr=0.3, weight_decay=1e-2, clamp=3.0, early_stop=0.5, optimizer="lbfgs")
    groups = [["{}"], ["A {}", "The {}"]]
    alone = [V.optimize_value(tiny_llama, r, 1, ["mlp"], groups, opts) for r in MORE]
    together = V.optimize_values(tiny_llama, MORE, 1, ["mlp"], groups, opts, batch_size=3)
    for a, b in zip(alone, together, strict=True):
        assert len(a.losses) == len(b.losses)
        assert torch.allclose(a.delta["mlp"], b.delta["mlp"], atol=1e-4, rtol=1e-3)


def test_rome_with_lbfgs_raises_the_target_probability_as_far_as_adam(tiny_llama, tmp_path, monkeypatch):
    """(A random 4-layer model moves little: δ reaches the logits only through attention, and the clamp holds.)"""
    from conftest import CORPUS
    from lmedit.metrics.scoring import score_targets

    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20) + "\n")
    prompt = REQ.template.format(REQ.subject)
    (before,) = score_targets(tiny_llama, [prompt], [REQ.target_new])
    got = {}
    for opt in ("adam", "lbfgs"):
        cfg = {**editor_class("rome").quick, "mom2_corpus": str(corpus), "v_optimizer": opt}
        edit = get_editor("rome", **cfg).compute(tiny_llama, REQ)
        with edit.applied(tiny_llama):
            (after,) = score_targets(tiny_llama, [prompt], [REQ.target_new])
        got[opt] = (after.nll, edit.meta["stats"]["value_loss"][-1])
        assert edit.meta["config"]["v_optimizer"] == opt
    assert got["lbfgs"][0] < before.nll
    assert got["lbfgs"][1] <= got["adam"][1] + 1e-3


def test_the_optimizer_reaches_the_value_options_and_the_hash_honestly():
    adam, lbfgs = LocateConfig(), LocateConfig(v_optimizer="lbfgs")
    assert value_options(lbfgs).optimizer == "lbfgs" and value_options(adam).optimizer == "adam"
    # the default is the old behaviour (added=True): configs cached before the option keep their hash
    plain = {k: v for k, v in adam.to_dict().items() if k != "v_optimizer"}
    assert adam.hash() == LocateConfig.from_dict(plain).hash()
    assert lbfgs.hash() != adam.hash()


def test_rome_smollm2_preset_uses_lbfgs_and_its_hash_says_so():
    cls = editor_class("rome")
    new = cls.Config.from_dict(cls.presets["smollm2-135m"])
    assert new.v_optimizer == "lbfgs"
    assert new.hash() != new.replace(v_optimizer="adam").hash()  # cells cached with Adam are not reused
