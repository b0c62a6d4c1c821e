"""T-Patcher: the patch neuron's formula, merged patches, the memory cache, sequential nesting."""

from __future__ import annotations

import torch

from lmedit import get_editor
from lmedit.edits import Edit, ModuleSwap
from lmedit.methods._ffn import ffn_info
from lmedit.methods.tpatcher import Patches, TPatcher, TPatcherConfig, ffn_input_memory
from lmedit.metrics.scoring import score_targets
from lmedit.types import EditRequest

FRANCE = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome")


def _random_patches(n: int, d: int = 32, seed: int = 0) -> Patches:
    g = torch.Generator().manual_seed(seed)
    p = Patches(d, n, "silu")
    with torch.no_grad():
        for t in (p.key, p.bias, p.value_dir, p.value_scale):
            t.copy_(torch.randn(t.shape, generator=g))
    return p


def test_patch_adds_act_of_key_times_value():
    p = _random_patches(2)
    p.base = torch.nn.Linear(32, 32)
    x = torch.randn(3, 5, 32)
    z = x @ p.key.T + p.bias  # [3, 5, 2]
    want = p.base(x) + torch.nn.functional.silu(z) @ (p.value_dir * p.value_scale)
    torch.testing.assert_close(p(x), want)


def test_standardised_key_folds_into_the_same_neuron():
    p = _random_patches(2)
    x = torch.randn(3, 5, 32)
    p.standardise(torch.randn(32), torch.rand(32) + 0.5)
    before = p.pre(x)
    p.fold()
    assert p.shift is None
    torch.testing.assert_close(p.pre(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.pre(x), x @ p.key.T + p.bias)


def test_init_separates_edit_from_memory(tiny_llama, request_darrieux, tmp_path, monkeypatch):
    """The init puts the edit at z = margin_act + 3 and memory below its margins, when they separate."""
    from lmedit.methods._ffn import answer_batch, prompt_views

    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    cfg = TPatcherConfig(**TPatcher.quick).replace(layer=tiny_llama.n_layers - 1)
    info = ffn_info(tiny_llama, cfg.layer)
    memory = ffn_input_memory(tiny_llama, info, cfg)
    ab = answer_batch(tiny_llama, prompt_views(request_darrieux, []), [request_darrieux.target_new])
    patch = Patches(info.d_model, 1, info.activation)
    patch.standardise(memory.mean(0), memory.std(0))
    TPatcher._init_patch(tiny_llama, info, ab, ab.rows, ab.cols, patch, memory, cfg, 0)
    from lmedit.hooks import trace

    with trace(tiny_llama.model, info.mlp, input=True, output=False, stop=True) as t:
        tiny_llama.model(**ab.inputs, use_cache=False)
    with torch.no_grad():
        z_edit = patch.pre(t.input[ab.rows, ab.cols]).mean()
        z_mem = patch.pre(memory)
    assert abs(float(z_edit) - (cfg.margin_act + 3)) < 1e-3
    assert float(z_mem.max()) <= min(cfg.margin_mem, float(z_edit) - cfg.margin_gap) - 1 + 1e-3


def test_concat_equals_nesting():
    a, b = _random_patches(1, seed=1), _random_patches(2, seed=2)
    base = torch.nn.Linear(32, 32)
    a.base = base
    b.base = a
    merged = Patches.concat([a, b])
    merged.base = base
    x = torch.randn(4, 32)
    torch.testing.assert_close(merged(x), b(x))


def test_memory_is_cached_on_handle_and_disk(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    cfg = TPatcherConfig(memory_size=50, memory_chunk=16)
    info = ffn_info(tiny_llama, 3)
    mem = ffn_input_memory(tiny_llama, info, cfg)
    assert mem.shape == (50, 32)
    files = list((tmp_path / "cache" / "ffn_memory").glob("*.safetensors"))
    assert len(files) == 1 and tiny_llama.fingerprint in files[0].name
    assert ffn_input_memory(tiny_llama, info, cfg) is mem  # handle cache
    tiny_llama.cache.clear()
    torch.testing.assert_close(ffn_input_memory(tiny_llama, info, cfg), mem)  # from disk


def test_edit_adds_patches_at_last_layer_and_raises_target(tiny, request_darrieux, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    digest = tiny.state_digest()
    before = sum(score_targets(tiny, [request_darrieux.text], ["English"])[0].logprobs)
    edit = get_editor("t-patcher", **TPatcher.quick).compute(tiny, request_darrieux)
    assert tiny.state_digest() == digest
    assert isinstance(edit, ModuleSwap)
    (path, module), = edit.modules.items()
    assert path == tiny.adapter.mlp.format(tiny.n_layers - 1)
    assert 1 <= module.key.shape[0] <= TPatcher.quick["max_patches"] == edit.meta["stats"]["patches"]
    with edit.applied(tiny):
        after = sum(score_targets(tiny, [request_darrieux.text], ["English"])[0].logprobs)
    assert after > before


def test_sequential_patches_nest_and_revert(tiny_llama, request_darrieux, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    editor = get_editor("t-patcher", **TPatcher.quick)
    base = score_targets(tiny_llama, [FRANCE.text], ["Rome"])[0]
    first = editor.edit(tiny_llama, request_darrieux)
    second = editor.edit(tiny_llama, FRANCE)  # trained on top of the first patch
    assert isinstance(tiny_llama.model.get_submodule("model.layers.3.mlp").base, Patches)
    loaded = Edit.load(second.save(tmp_path / "second"))
    second.revert(tiny_llama)
    with loaded.applied(tiny_llama):
        assert score_targets(tiny_llama, [FRANCE.text], ["Rome"])[0].prob > base.prob
    first.revert(tiny_llama)
    assert score_targets(tiny_llama, [FRANCE.text], ["Rome"])[0] == base
    assert type(tiny_llama.model.get_submodule("model.layers.3.mlp")).__name__ == "LlamaMLP"


def test_memory_loss_keeps_patch_quieter_on_text_than_on_edit(tiny_llama, request_darrieux, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    cfg = {**TPatcher.quick, "mlc": 10.0, "max_patches": 1}
    edit = get_editor("t-patcher", **cfg).compute(tiny_llama, request_darrieux)
    (module,) = edit.modules.values()
    info = ffn_info(tiny_llama, 3)
    mem = ffn_input_memory(tiny_llama, info, TPatcherConfig(**{k: cfg[k] for k in ("memory_size", "memory_chunk")}))
    z_mem = module.pre(mem)[:, 0]
    assert (z_mem < 0).float().mean() > 0.9


def test_margin_exp_is_finite_and_continuous():
    from lmedit.methods.tpatcher import _exp

    x = torch.tensor([-3.0, 0.0, 19.999, 20.0, 20.001, 500.0], requires_grad=True)
    y = _exp(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:4], torch.exp(x[:4]).detach())
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[-1] > 0  # still pushes back when far past the margin
