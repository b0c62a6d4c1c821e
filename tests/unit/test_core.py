"""Core records, configs, registry, adapters, token policy and Edit kinds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmedit.config import Config, ConfigError, option
from lmedit.digests import tensor_digest
from lmedit.edits import Edit, EditError, EditMismatchError, PromptContext, WeightDelta
from lmedit.models.adapter import UnsupportedArchitectureError
from lmedit.models.handle import ModelHandle
from lmedit.models.lookup import adapter_for
from lmedit.types import EditInputError, EditRequest, to_template


# --- records ---------------------------------------------------------------------------------------
def test_request_template_from_literal_subject():
    r = EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                    target_new="English")
    assert r.template == "The mother tongue of {} is"
    assert r.text == "The mother tongue of Danielle Darrieux is"


def test_request_keeps_literal_braces():
    assert to_template("Set {a} for Bob now", "Bob").format("Bob") == "Set {a} for Bob now"


@pytest.mark.parametrize(
    "prompt,subject,target,match",
    [
        ("The capital of France is", "Italy", "Rome", "does not occur"),
        ("Paris is Paris", "Paris", "x", "occurs 2 times"),
        ("The capital of {} is", "France", " ", "target_new is empty"),
        ("The capital of {} and {} is", "France", "Paris", "slots"),
        ("The capital of {} is", " ", "Paris", "subject is empty"),
    ],
)
def test_request_bad_input(prompt, subject, target, match):
    with pytest.raises(EditInputError, match=match):
        EditRequest(prompt=prompt, subject=subject, target_new=target)


def test_request_from_dict_rejects_unknown():
    with pytest.raises(EditInputError, match="unknown request field"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "a", "target_new": "b", "tgt": 1})


# --- configs ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Cfg(Config):
    layers: list[int] | None = option(None, "layers")
    lr: float = option(0.5, "step size")
    steps: int = option(10, "steps")
    flag: bool = option(False, "a flag")


def test_config_coercion_and_roundtrip():
    c = _Cfg.from_dict({"lr": "5e-1", "steps": "20", "layers": [1, "2"], "flag": "true"})
    assert c.lr == 0.5 and c.steps == 20 and c.layers == [1, 2] and c.flag is True
    assert _Cfg.from_dict(c.to_dict()) == c
    assert c.hash() == _Cfg.from_dict(c.to_dict()).hash()
    assert c.hash() != c.replace(lr=0.1).hash()


def _versions() -> tuple[type, type]:
    """The same config before and after a release that added ``stop`` (old behaviour as its default)."""

    @dataclasses.dataclass
    class Cfg(Config):
        lr: float = option(0.5, "step size")

    old = Cfg

    @dataclasses.dataclass  # noqa: F811  (the same name on purpose: the hash includes the type's name)
    class Cfg(Config):
        lr: float = option(0.5, "step size")
        stop: float = option(0.05, "added later", added=True)
        where: str | None = option(None, "a location", identity=False)

    return old, Cfg


def test_config_hash_ignores_locations_and_added_fields_at_their_default():
    old, new = _versions()
    assert new(lr=0.3).hash() == old(lr=0.3).hash() == new(lr=0.3, where="/x").hash()
    assert new(lr=0.3, stop=0.0).hash() != old(lr=0.3).hash()  # an added field counts once it is changed


def test_config_is_coerced_and_validated_however_it_is_built():
    from lmedit.methods.calinet import CaliNetConfig

    assert CaliNetConfig(lr="1e-3").lr == 1e-3  # the constructor coerces like from_dict
    with pytest.raises(ConfigError, match="width and steps must be"):
        CaliNetConfig(steps=0)  # and validates: no way around the checks
    with pytest.raises(ConfigError, match="expected an integer"):
        CaliNetConfig(width="wide")
    with pytest.raises(ConfigError, match="width and steps must be"):
        CaliNetConfig().replace(steps=0)


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="unknown _Cfg key"):
        _Cfg.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="expected an integer"):
        _Cfg.from_dict({"steps": 1.5})


# --- adapters --------------------------------------------------------------------------------------
def test_adapter_unsupported_architecture_names_it():
    class Weird(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedArchitectureError, match="(?s)Weird.*register_adapter"):
        adapter_for(Weird())


def test_adapter_paths_resolve(tiny):
    a, m = tiny.adapter, tiny.model
    n = tiny.n_layers
    assert n >= 2
    for i in range(n):
        assert a.module(m, a.mlp_out, i) is not None
        assert a.module(m, a.layer(i)) is not None
    out_proj = a.module(m, a.mlp_out, 0)
    w = a.weight_out_in(out_proj)
    cfg = m.config
    hidden = cfg.n_embd if hasattr(cfg, "n_embd") else cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.d_model
    assert w.shape[0] == hidden  # [out = d_model, in = d_ff] whatever the storage layout
    with pytest.raises(ValueError, match="out of range"):
        a.check_layers(m, [n])


# --- tokens ----------------------------------------------------------------------------------------
def test_target_ids_use_leading_space(tiny_llama):
    t = tiny_llama.tokens
    spaced = t.encode(" English")
    assert t.target_ids("The mother tongue of Danielle Darrieux is", "English") == spaced
    assert spaced != t.encode("English")


def test_teacher_forced_positions_left_and_right(tiny_llama):
    t = tiny_llama.tokens
    prompts, targets = ["The capital of France is", "Paris"], ["Paris", "is in France"]
    for side in ("left", "right"):
        b = t.teacher_forced(prompts, targets, side=side)
        for i in range(2):
            start, n = b.spans[i]
            assert b.input_ids[i, start : start + n].tolist() == b.labels[i]
    right = t.teacher_forced(prompts, targets, "right")
    left = t.teacher_forced(prompts, targets, "left")
    with torch.no_grad():
        lr_ = tiny_llama.logits(right)
        ll_ = tiny_llama.logits(left)
    for i in range(2):
        a = lr_[i, right.pred_positions(i)]
        b = ll_[i, left.pred_positions(i)]
        assert torch.allclose(a, b, atol=1e-4), "left padding must not move positions"


# --- edits -----------------------------------------------------------------------------------------
def _delta(handle, scale=0.5):
    name = handle.adapter.mlp_out.format(0) + ".weight"
    p = handle.model.get_parameter(name)
    return name, WeightDelta({name: torch.randn_like(p) * p.detach().std() * scale}, {name: tensor_digest(p)},
                             meta={"model_fingerprint": handle.fingerprint, "model_name": handle.name})


def test_weight_delta_apply_revert_bit_exact(tiny, tmp_path):
    before = tiny.state_digest()
    name, d = _delta(tiny)
    with d.applied(tiny):
        assert tiny.state_digest() != before
        with pytest.raises(EditError, match="already applied"):
            d.apply(tiny)
    assert tiny.state_digest() == before
    with pytest.raises(EditError, match="not applied"):
        d.revert(tiny)
    d.save(tmp_path / "e")
    d2 = Edit.load(tmp_path / "e")
    d2.apply(tiny)
    p = tiny.model.get_parameter(name)
    d2.revert(tiny)
    assert tiny.state_digest() == before
    assert "WeightDelta" in d2.describe()
    assert p is not None


def test_weight_delta_low_rank(tiny_llama):
    name = tiny_llama.adapter.mlp_out.format(1) + ".weight"
    p = tiny_llama.model.get_parameter(name)
    a, b = torch.randn(p.shape[0], 1), torch.randn(p.shape[1], 1)
    before = p.detach().clone()
    with WeightDelta({name: (a, b)}).applied(tiny_llama):
        assert torch.allclose(p, before + a @ b.T, atol=1e-6)
    assert torch.equal(p, before)


def test_weight_delta_refuses_nan_and_leaves_model(tiny_llama):
    before = tiny_llama.state_digest()
    n1 = tiny_llama.adapter.mlp_out.format(0) + ".weight"
    n2 = tiny_llama.adapter.mlp_out.format(1) + ".weight"
    good = torch.zeros_like(tiny_llama.model.get_parameter(n1))
    bad = torch.full_like(tiny_llama.model.get_parameter(n2), float("nan"))
    with pytest.raises(EditError, match="NaN"):
        WeightDelta({n1: good + 1.0, n2: bad}).apply(tiny_llama)
    assert tiny_llama.state_digest() == before


def test_weight_delta_refuses_other_model(tokenizer):
    from conftest import make_model

    h1 = ModelHandle(make_model("llama"), tokenizer)
    m2 = make_model("llama")
    with torch.no_grad():
        m2.model.layers[0].mlp.down_proj.weight.add_(1.0)
    h2 = ModelHandle(m2, tokenizer)
    _, d = _delta(h1)
    with pytest.raises(EditMismatchError, match="fingerprint"):
        d.apply(h2)


def test_weight_delta_strict_base_values(tiny_llama):
    _, d1 = _delta(tiny_llama)
    _, d2 = _delta(tiny_llama)
    d1.apply(tiny_llama)
    with pytest.raises(EditMismatchError, match="does not hold the values"):
        d2.apply(tiny_llama)
    d2.apply(tiny_llama, strict=False)
    d2.revert(tiny_llama)
    d1.revert(tiny_llama)


def _record_bytes(record) -> int:
    if isinstance(record, torch.Tensor):
        return record.numel() * record.element_size()
    return sum(_record_bytes(x) for x in record) if isinstance(record, tuple) else 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-3, 0.1, 10.0])
def test_many_weight_edits_revert_bit_exact_from_a_fraction_of_a_copy(tiny_llama, dtype, scale):
    """Twenty low-rank edits stacked on one weight (as a sequential run stacks them) revert newest first to the
    bit; each keeps far less than a copy of the weight (small updates: a few percent of it), whatever the
    update's size, including entries where the update dwarfs the weight."""
    tiny_llama.model.to(dtype)
    name = tiny_llama.adapter.mlp_out.format(1) + ".weight"
    p = tiny_llama.model.get_parameter(name)
    with torch.no_grad():
        p.view(-1)[:7] = torch.tensor([0.0, 1e-30, -1e-30, 1e-8, -3.0, 2.0, 65000.0]).to(dtype)  # tiny, huge, zero
    before, states = tiny_llama.state_digest(), []
    ref = p.detach().float().view(-1)[7:].norm()  # updates relative to the ordinary entries
    gen = torch.Generator().manual_seed(0)
    edits = []
    for _ in range(20):
        a, b = torch.randn(p.shape[0], 2, generator=gen), torch.randn(p.shape[1], 2, generator=gen)
        a *= scale * ref / (a @ b.T).norm()
        edits.append(WeightDelta({name: (a, b)}).apply(tiny_llama))
        states.append(tiny_llama.state_digest())
    sizes = [_record_bytes(e._applied_to[id(tiny_llama.model)][name]) for e in edits]
    assert max(sizes) < p.numel() * p.element_size() * (0.06 if scale < 0.01 else 0.6), sizes
    for i in reversed(range(20)):
        assert tiny_llama.state_digest() == states[i]
        edits[i].revert(tiny_llama)
    assert tiny_llama.state_digest() == before


def test_weight_revert_refuses_a_weight_changed_behind_its_back(tiny_llama):
    """A weight changed outside lmedit after an edit: the revert says so and changes nothing (it cannot know
    what to put back), rather than writing a wrong 'original'."""
    name = tiny_llama.adapter.mlp_out.format(1) + ".weight"
    p = tiny_llama.model.get_parameter(name)
    a, b = torch.randn(p.shape[0], 1) * 0.01, torch.randn(p.shape[1], 1)
    edit = WeightDelta({name: (a, b)}).apply(tiny_llama)
    with torch.no_grad():
        p.view(-1)[3] += 1.0
    changed = tiny_llama.state_digest()
    with pytest.raises(EditError, match="no longer holds what this edit wrote"):
        edit.revert(tiny_llama)
    assert tiny_llama.state_digest() == changed and edit.is_applied(tiny_llama)
    with torch.no_grad():
        p.view(-1)[3] -= 1.0  # the weight holds what the edit wrote again, but its update now recomputes otherwise
    a0 = a.clone()
    a.mul_(1.001)
    with pytest.raises(EditError, match="did not give back the weights before it"):
        edit.revert(tiny_llama)
    a.copy_(a0)
    edit.revert(tiny_llama)
    assert not edit.is_applied(tiny_llama)


def test_prompt_context_changes_inputs_not_weights(tiny_llama, tmp_path):
    before = tiny_llama.state_digest()
    e = PromptContext("New Fact: x\n", meta={"model_fingerprint": tiny_llama.fingerprint})
    with e.applied(tiny_llama):
        assert tiny_llama.render("q") == "New Fact: x\nq"
    assert tiny_llama.render("q") == "q" and tiny_llama.state_digest() == before
    e.save(tmp_path / "c")
    assert Edit.load(tmp_path / "c").context == "New Fact: x\n"


def test_load_reports_corruption(tmp_path):
    (tmp_path / "edit.json").write_text("{not json")
    with pytest.raises(EditError, match="corrupted"):
        Edit.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a saved edit"):
        Edit.load(tmp_path / "nothing")


# --- registry --------------------------------------------------------------------------------------
def test_registry_unknown_method_suggests():
    from lmedit.registry import UnknownMethodError, get_editor, list_editors

    names = list_editors()
    assert names == sorted(names)
    with pytest.raises(UnknownMethodError, match="unknown editing method"):
        get_editor("definitely-not-a-method")


def test_import_lmedit_loads_no_method():
    import subprocess
    import sys

    code = "import lmedit, sys; print(any(m.startswith('lmedit.methods.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_generate_on_every_family(tiny):
    text = tiny.generate("The capital of France is", max_new_tokens=3)
    assert isinstance(text, str)


def test_replayed_stands_in_and_restores(tiny_llama):
    import torch

    from lmedit.hooks import Replay, get_module, replayed, trace

    h = tiny_llama
    ids = torch.tensor([[1, 5, 7, 9]])
    with trace(h.model, h.adapter.layer(1)) as t:
        want = h.model(input_ids=ids).logits
    paths = [h.adapter.layer(0), h.adapter.layer(1)]
    before = [get_module(h.model, p) for p in paths]
    with replayed(h.model, dict.fromkeys(paths, t.output)) as stand_ins:
        assert all(isinstance(get_module(h.model, p), Replay) for p in paths)
        assert stand_ins[paths[0]].self_attn is before[0].self_attn  # unknown attributes: the original's
        torch.testing.assert_close(h.model(input_ids=ids).logits, want)
    assert [get_module(h.model, p) for p in paths] == before


def test_cache_key_is_stable_readable_and_finds_entries_under_their_old_name(tmp_path):
    from lmedit.io import cache_key, cache_path

    key = cache_key("mom2", None, {"layer": 3, "tokens": 100, "corpus": "abc"}, show=("layer",))
    assert key == cache_key("mom2", None, {"corpus": "abc", "tokens": 100, "layer": 3}, show=("layer",))
    assert key.startswith("mom2-layer3-") and len(key.rsplit("-", 1)[1]) == 16
    assert cache_key("mom2", "f00d", {"layer": 3}).startswith("mom2-f00d-")
    assert len({key, cache_key("mom2", None, {"layer": 3, "tokens": 101, "corpus": "abc"}, show=("layer",)),
                cache_key("mom2", "f00d", {"layer": 3, "tokens": 100, "corpus": "abc"}, show=("layer",)),
                cache_key("nullspace", None, {"layer": 3, "tokens": 100, "corpus": "abc"}, show=("layer",))}) == 4
    old = tmp_path / "old-name.pt"
    old.write_bytes(b"computed long ago")
    new = cache_path(tmp_path, key, ".pt", legacy=old)
    assert new.name == f"{key}.pt" and new.read_bytes() == b"computed long ago" and old.exists()
    assert cache_path(tmp_path, key, ".pt", legacy=old) == new  # already there: nothing to do
    assert not cache_path(tmp_path / "none", key, ".pt", legacy=tmp_path / "missing").exists()
