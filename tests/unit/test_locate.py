"""Shared locate-then-edit machinery on the tiny models: templates, keys, values, statistics, editors' guards."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import CORPUS, make_handle
from lmedit.config import ConfigError
from lmedit.edits import EditError
from lmedit.locate import keys as K
from lmedit.locate import rows as R
from lmedit.locate import stats as S
from lmedit.locate import suffix as Sx
from lmedit.locate import values as V
from lmedit.locate.pipeline import depth_layers, width_lambda
from lmedit.locate.templates import context_templates, group_mean
from lmedit.registry import editor_class, get_editor
from lmedit.types import EditRequest

REQ = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
LOCATE = ["rome", "memit", "emmet", "alphaedit", "pmet"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS * 20) + "\n = Heading = \n The tower is 324 @-@ metres tall @,@ really .\n")
    return path


def quick(name: str, corpus, *, value_cache: str | None = None, **kw):
    from lmedit.config import RunOptions

    return get_editor(name, **{**editor_class(name).quick, "mom2_corpus": str(corpus), **kw},
                      options=RunOptions(value_cache=value_cache))


# --- templates ------------------------------------------------------------------------------------------
def test_templates_are_seeded_grouped_and_cached_on_the_handle(tokenizer):
    h = make_handle("llama", tokenizer)
    groups = context_templates(h, [(5, 10), (10, 10)], seed=0)
    assert groups[0] == ["{}"] and [len(g) for g in groups] == [1, 10, 10]
    assert all(t.count("{}") == 1 and t.endswith(". {}") for g in groups[1:] for t in g)
    assert context_templates(h, [(5, 10), (10, 10)], seed=0) == groups
    other = make_handle("llama", tokenizer)
    assert context_templates(other, [(5, 10), (10, 10)], seed=0) == groups  # seeded: same model, same text
    assert context_templates(h, [(5, 10), (10, 10)], seed=1) != groups
    assert len(h.cache) == 2 and not other.cache.keys() - h.cache.keys()


def test_group_mean_averages_inside_groups_first():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    assert float(group_mean(x, [0, 1, 1])[0]) == pytest.approx((0 + 2) / 2)


# --- subject positions and keys -------------------------------------------------------------------------
def test_subject_last_index(tokenizer):
    tokens = make_handle("gpt2", tokenizer).tokens
    row = K.subject_last(tokens, "The mother tongue of {} is", "Danielle Darrieux")
    assert tokens.words(list(row.ids))[row.index] == " Darrieux"
    last = K.subject_last(tokens, "The mother tongue of {}", "Danielle Darrieux")  # subject ends the prompt
    assert last.index == len(last.ids) - 1


def test_subject_that_merges_with_the_following_text(tokenizer):
    tokens = make_handle("gpt2", tokenizer).tokens
    # alone, "Danielle Darrie" ends in " Darrie"; inside the prompt BPE merges it into " Darrieux"
    assert tokens.encode(" Danielle Darrie")[-1] not in tokens.encode(" Danielle Darrieux was")
    row = K.subject_last(tokens, "{}ux was an actress", "Danielle Darrie")
    assert tokens.words(list(row.ids))[row.index] == " Darrieux"
    row = K.subject_last(tokens, "The capital of {}s", "France")  # "...France" + "s" -> [..., "c", "es"]
    assert tokens.words(list(row.ids))[row.index] == "es"


def test_batched_keys_equal_single_unpadded_passes(tiny_decoder):
    h = tiny_decoder
    reqs = [REQ, EditRequest(prompt="{} is in", subject="Tokyo", target_new="Japan")]
    groups = [["{}"], ["The tower is tall. {}", "I. {}"]]
    got = K.compute_keys(h, reqs, [1, 2], groups)  # one padded forward, two layers
    assert got[1].shape[:2] == got[2].shape[:2] == (2, 3)
    for r, req in enumerate(reqs):
        for t, ctx in enumerate(["{}", "The tower is tall. {}", "I. {}"]):
            row = K.subject_last(h.tokens, ctx.replace("{}", req.template), req.subject)
            with torch.no_grad():
                for layer in (1, 2):
                    seen = {}
                    mod = h.model.get_submodule(h.adapter.mlp_out.format(layer))
                    hook = mod.register_forward_pre_hook(lambda m, a, seen=seen: seen.setdefault("k", a[0]))
                    h.model(input_ids=torch.tensor([row.ids]))
                    hook.remove()
                    assert torch.allclose(got[layer][r, t], seen["k"][0, row.index].float(), atol=1e-5)


# --- values -------------------------------------------------------------------------------------------------
def test_value_optimisation_replays_lower_layers_exactly(tiny_decoder):
    h = tiny_decoder
    groups = [["{}"], ["The tower is tall. {}"]]
    p = R.problem(h, REQ, groups)
    full = Sx.loss_logits(h, p)
    out = {}
    hook = h.model.get_submodule(h.adapter.layer(1)).register_forward_hook(lambda m, a, o: out.setdefault("o", o))
    Sx.loss_logits(h, p)
    hook.remove()
    with Sx.replaying(h, 2, out["o"]):
        assert torch.equal(Sx.loss_logits(h, p), full)
    assert full.shape[0] == len(p.rows)  # logits at loss positions only


def test_answer_end_teaches_one_more_token_after_the_answer(tiny_decoder):
    h = tiny_decoder
    groups = [["{}"], ["The tower is tall. {}"]]
    plain, ended = R.problem(h, REQ, groups), R.problem(h, REQ, groups, end="\n")
    newline = h.tokens.encode("\n")
    assert len(newline) == 1
    rewrite = plain.n_rewrite.item()
    assert len(ended.labels) == len(plain.labels) + rewrite  # one more target position per rewriting row
    for r in range(rewrite):
        mine = ended.labels[ended.owner == r].tolist()
        assert mine[:-1] == plain.labels[plain.owner == r].tolist() and mine[-1] == newline[0]
        assert ended.seqs[r][:-1] == plain.seqs[r] and ended.seqs[r][-1] == plain.labels[plain.owner == r][-1]
    assert ended.seqs[-1] == plain.seqs[-1], "the KL row is unchanged"


def test_answer_end_is_part_of_the_value_cache_scope_only_when_set(tiny_decoder):
    from lmedit.locate.value_store import ValueStore

    base = ValueStore.scope(tiny_decoder, 1, ["mlp"], V.ValueOptions(), [["{}"]])
    ended = ValueStore.scope(tiny_decoder, 1, ["mlp"], V.ValueOptions(answer_end="\n"), [["{}"]])
    assert base != ended
    assert "answer_end" not in str(base)  # values cached before the option existed keep their folder


@pytest.mark.parametrize("subject", ["Danielle Darrieux", "I"])  # "I" starts a prompt: an empty prefix
def test_suffix_forward_with_prefix_cache_equals_the_full_forward(tiny_decoder, subject):
    h = tiny_decoder
    req = EditRequest(prompt="{} was born in", subject=subject, target_new="Paris")
    p = R.problem(h, req, [["{}"], ["The tower is tall. {}", "I. {}"]])
    sites = V._Sites(h, {"layer": V.site_path(h.adapter, "layer", 1)}, p)
    try:
        with torch.enable_grad():
            clean, _ = Sx.clean_pass(h, p, 1)
            suffix, first = Sx.suffix_forward(h, p, sites, clean, 1)
            assert suffix is not None and first.requires_grad  # step 0 of an optimisation: the graph to δ
            assert torch.allclose(first, clean, atol=1e-5)
            sites.delta["layer"][0].data += 0.5
            fast = suffix.logits()
            sites.set_index(p.index)
            assert torch.allclose(fast, Sx.loss_logits(h, p), atol=1e-5)
            assert not torch.equal(fast, clean)  # δ reaches the loss positions (weakly in random models)
    finally:
        sites.close()


@pytest.mark.parametrize("sites", [["mlp"], ["layer"], ["attn", "mlp"]])
def test_value_optimisation_lowers_the_loss_and_respects_the_clamp(tiny_llama, sites):
    opts = V.ValueOptions(steps=15, lr=0.1, weight_decay=0.0, clamp=3.0)
    res = V.optimize_value(tiny_llama, REQ, 1, sites, [["{}"]], opts)
    assert res.losses[-1] < res.losses[0]
    for s in sites:
        assert res.delta[s].norm() <= 3.0 * res.init[s].norm() * (1 + 1e-5)
        assert res.target(s).dtype == torch.float32


JOINT = [EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
         EditRequest(prompt="{} was born in", subject="I", target_new="the city of Paris"),
         EditRequest(prompt="{} plays the", subject="Tom", target_new="violin"),
         EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome"),
         EditRequest(prompt="{} works for", subject="Anna Smith", target_new="BBC News today")]


def _threshold_with_most_stopping_steps(runs: list[list[float]]) -> float:
    """An early-stop threshold, midway between two loss values, at which the requests stop at the most
    different steps (each run stops at its first loss below it)."""
    values = sorted({x for r in runs for x in r})
    best, most = 0.0, 0
    for lo, hi in zip(values, values[1:], strict=False):
        t = (lo + hi) / 2
        steps = {next((i for i, x in enumerate(r) if x < t), len(r)) for r in runs}
        if len(steps) > most and hi - lo > 1e-3 * hi:
            best, most = t, len(steps)
    return best


def _in_float64(handle, monkeypatch):
    """Run the value optimisation in float64: the model, new tensors, and the ``.float()`` casts that keep
    its variables in float32 (values.py) all become float64."""
    handle.model.double()
    monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **k: self.double())
    torch.set_default_dtype(torch.float64)  # the caller sets float32 back


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("sites", [["layer"], ["attn", "mlp"]])
@pytest.mark.parametrize("suffix_path", [True, False])
def test_values_optimised_together_equal_values_optimised_alone(tiny_decoder, sites, suffix_path, dtype,
                                                                monkeypatch):
    """One batch of rows for several requests: each request keeps its own gradient, Adam state, clamp and
    stopping step (requests stop at different steps here, so the batch shrinks while it runs).

    Why two tolerances (issue 15, defect 0: on an AMD EPYC the float32 test failed with δ -0.0011 vs
    -0.0012 against a tolerance of 4e-6). The batched path is the same computation with larger matrices, so
    its float32 sums are reduced in another order. Measured on the tiny models (max |δ_alone − δ_batch| /
    ‖δ‖, same stopping steps in every case):

    ==========================  ===================  ===================  =========
    sites, path                 float32, 1 thread    float32, 2 threads   float64
    ==========================  ===================  ===================  =========
    gpt2 layer, suffix          3.0e-06              2.8e-06              5.4e-15
    gpt2 attn+mlp, suffix/full  8.7e-05              3.8e-04              9.8e-13
    llama layer, suffix/full    1.6e-06 / 1.4e-06                         3.0e-16
    llama attn+mlp, suffix/full 5.4e-05 / 4.6e-05                         1.1e-14
    ==========================  ===================  ===================  =========

    In float64 the difference vanishes (1e-12 or less): no bug, float32 reduction order. Adam amplifies it:
    it divides each coordinate's gradient by its own running RMS, so a coordinate whose gradient is mostly
    round-off moves by up to ``lr`` per step whatever the size of that round-off; the elementwise float32
    difference therefore depends on the CPU's kernels (thread count changes it 4x above) and has no bound
    near float32's epsilon. So the exactness claim is checked in float64 (1e-9 of ‖v₀‖ + ‖δ‖), and float32
    only checks what it guarantees on any CPU: the same stopping steps, losses within 1e-3, and δ within 5%
    of its norm (a request that leaked into another's gradient or Adam state moves δ by O(‖δ‖)).
    """
    h, groups = tiny_decoder, [["{}"], ["The tower is tall. {}", "I. {}"]]
    if dtype == "float64":
        _in_float64(h, monkeypatch)
    try:
        _check_together_equals_alone(h, groups, sites, suffix_path, dtype, monkeypatch)
    finally:
        torch.set_default_dtype(torch.float32)


def _check_together_equals_alone(h, groups, sites, suffix_path, dtype, monkeypatch):
    if not suffix_path:  # the full-forward path, which keeps every row until the batch ends
        monkeypatch.setattr(V, "_suffix_forward", lambda *a: (None, None))
    free = V.ValueOptions(steps=12, lr=0.2, weight_decay=1e-2, clamp=2.0, early_stop=0.0)
    runs = [V.optimize_value(h, r, 1, sites, groups, free).losses for r in JOINT]
    opts = dataclasses.replace(free, early_stop=_threshold_with_most_stopping_steps(runs))
    alone = [V.optimize_value(h, r, 1, sites, groups, opts) for r in JOINT]
    together = V.optimize_values(h, JOINT, 1, sites, groups, opts, batch_size=4)  # a batch of 4, then 1
    assert len({len(a.losses) for a in alone}) > 1  # different stopping steps
    exact = dtype == "float64"
    for a, t in zip(alone, together, strict=True):
        assert len(a.losses) == len(t.losses)
        assert a.losses == pytest.approx(t.losses, rel=1e-9 if exact else 1e-3, abs=1e-12 if exact else 1e-5)
        for s in sites:
            assert a.delta[s].dtype == (torch.float64 if exact else torch.float32)
            scale = float(a.init[s].norm() + a.delta[s].norm())
            assert torch.allclose(a.init[s], t.init[s], rtol=0, atol=(1e-9 if exact else 1e-5) * scale)
            for v in (t.init[s], t.delta[s]):  # standalone tensors: no view keeps the batch's activations
                assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
            if exact:
                assert torch.allclose(a.delta[s], t.delta[s], rtol=0, atol=1e-9 * scale)
            else:
                assert float((a.delta[s] - t.delta[s]).norm()) <= 0.05 * float(a.delta[s].norm()) + 1e-7


def test_pmet_stop_rule_is_per_request_in_a_batch(tiny_llama):
    """PMET's rule (×0.1 NLL once every target token is the argmax; stop once KL ≤ 0.01) per request."""
    h = tiny_llama
    p = R.assemble(h, [R.request_rows(h, r, [["{}"]]) for r in JOINT[:3]])
    n_t, vocab = len(p.labels), h.model.config.vocab_size
    logits = torch.zeros(n_t + 3, vocab)
    kl_init = torch.log_softmax(torch.randn(3, vocab), -1)
    logits[n_t:] = kl_init  # KL 0 for every request ...
    logits[n_t + 2, 0] += 5.0  # ... but request 2's
    logits[torch.arange(n_t), p.labels] = 10.0  # every target is the argmax ...
    first_of_1 = int((p.request[p.owner] == 1).nonzero()[0])
    logits[first_of_1, (p.labels[first_of_1] + 1) % vocab] = 20.0  # ... except one of request 1's
    zero = torch.zeros(4)
    sites = SimpleNamespace(delta={"mlp": [zero] * 3}, init={"mlp": [torch.ones(4)] * 3}, order=[0, 1, 2])
    opts = V.ValueOptions(confident_stop=True, kl_factor=0.5, weight_decay=0.0)
    loss, confident = V._losses(p, logits, kl_init, sites, opts)
    assert confident == [True, False, False]
    plain, _ = V._losses(p, logits, kl_init, sites, dataclasses.replace(opts, confident_stop=False))
    assert loss[0] == pytest.approx(0.1 * plain[0]) and loss[1] == pytest.approx(plain[1])
    assert loss[2] < plain[2]  # its targets are all hit: NLL scaled, KL kept


# --- statistics ---------------------------------------------------------------------------------------------
def test_stats_match_a_naive_computation_and_one_pass_serves_all_layers(tiny_llama, corpus, home):
    h = tiny_llama
    stats = S.collect_stats(h, [0, 2], corpus=corpus, tokens=600, batch_tokens=256, cache=False)
    rows = list(S.token_rows(h.tokens, [corpus], 600, S.context_length(h.model)))
    for layer in (0, 2):
        ks = []
        mod = h.model.get_submodule(h.adapter.mlp_out.format(layer))
        hook = mod.register_forward_pre_hook(lambda m, a, ks=ks: ks.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for r in rows:
                h.model(input_ids=torch.tensor([r]))
        hook.remove()
        k = torch.cat(ks).double()
        assert k.shape[0] == 600
        assert torch.allclose(stats[layer], k.T @ k / 600, rtol=1e-5, atol=1e-9)


def test_stats_cache_resume_and_refusals(tiny_llama, corpus, home, monkeypatch):
    h = tiny_llama
    want = S.collect_stats(h, [1], corpus=corpus, tokens=800, batch_tokens=256, cache=False)[1]
    calls = {"n": 0}
    real = h.model.forward

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(h.model, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        S.collect_stats(h, [1], corpus=corpus, tokens=800, batch_tokens=256, save_every=1)
    got = S.collect_stats(h, [1], corpus=corpus, tokens=800, batch_tokens=256, save_every=1)[1]
    assert torch.allclose(got, want) and calls["n"] == 5  # 2 batches before the stop, the last 2 after it
    monkeypatch.setattr(h.model, "forward", real)
    files = list((home / "stats" / h.fingerprint).glob("mom2-layer1-*"))
    assert len(files) == 1
    assert torch.equal(S.collect_stats(h, [1], corpus=corpus, tokens=800)[1], got)  # from disk
    other = make_handle("llama", h.tokenizer)
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    other.fingerprint = "f" * 16
    (home / "stats" / other.fingerprint).mkdir(parents=True)
    shutil.copy(files[0], home / "stats" / other.fingerprint / files[0].name)
    with pytest.raises(S.StatsError, match="refusing"):
        S.collect_stats(other, [1], corpus=corpus, tokens=800)


def test_stats_cached_under_the_old_file_name_are_found_and_linked(tiny_llama, corpus, home, monkeypatch):
    """Statistics computed before lmedit.io.cache_key named the files (mom2-L<layer>-<corpus>-<n>-<dtype>.pt)
    are used, not recomputed: linked to the new name, the old name kept for older versions."""
    h = tiny_llama
    want = S.collect_stats(h, [1], corpus=corpus, tokens=400, batch_tokens=256)[1]
    folder = home / "stats" / h.fingerprint
    (new,) = folder.glob("mom2-layer1-*")
    old = folder / f"mom2-L1-{S.corpus_hash(S.corpus_files(corpus))}-400-float32.pt"  # the name before
    new.rename(old)
    h.cache.clear()
    monkeypatch.setattr(h.model, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert torch.equal(S.collect_stats(h, [1], corpus=corpus, tokens=400, batch_tokens=256)[1], want)
    assert new.exists() and old.exists() and new.stat().st_ino == old.stat().st_ino


def test_stats_errors_and_corpus_cleaning(tiny_llama, tmp_path, monkeypatch):
    with pytest.raises(S.StatsError, match="does not exist"):
        S.collect_stats(tiny_llama, [1], corpus=tmp_path / "missing.txt", tokens=100)
    monkeypatch.setenv("LMEDIT_CORPUS", str(tmp_path / "nope"))
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    import lmedit.data.paths as data_paths

    monkeypatch.setattr(data_paths, "candidates", lambda relative: [tmp_path / "absent" / relative])
    with pytest.raises(S.StatsError, match="no text corpus"):
        S.corpus_files(None)
    with pytest.raises(ValueError, match="out of range"):
        S.collect_stats(tiny_llama, [9], corpus=tmp_path, tokens=100)
    assert S.clean_line(" The 1 @,@ 063 @-@ foot tower , built in 1 @.@ 5 years . ") == \
        "The 1,063-foot tower, built in 1.5 years."
    assert S.clean_line(" = = Heading = = ") == ""


# --- editors: defaults and guards ---------------------------------------------------------------------------
def test_defaults_from_depth_and_width(tiny_llama):
    assert depth_layers(tiny_llama, 0.17, 5) == [0, 1, 2, 3]
    cfg = get_editor("memit").config_for(tiny_llama)
    d_ff = tiny_llama.model.config.intermediate_size
    assert cfg.layers == [0, 1, 2, 3]
    assert cfg.mom2_update_weight == pytest.approx(round(15000 * d_ff / 11008, 1))
    assert width_lambda(tiny_llama, 0) == pytest.approx(15000 * d_ff / 11008)
    assert get_editor("rome").config_for(tiny_llama).layers == [0]


@pytest.mark.parametrize("name", LOCATE)
def test_layers_out_of_range_are_refused(name, tiny_llama, corpus, home):
    with pytest.raises(ValueError, match="out of range"):
        quick(name, corpus, layers=[7]).compute(tiny_llama, REQ)


def test_rome_config_checks():
    with pytest.raises(ConfigError, match="exactly one layer"):
        get_editor("rome", layers=[1, 2])
    with pytest.raises(ConfigError):
        get_editor("rome", key_mode="buggy")


@pytest.mark.parametrize("mode", ["consistent", "original", "prompt"])
def test_rome_key_modes_and_stats(mode, tiny_gpt2_handle, corpus, home):
    h = tiny_gpt2_handle
    before = h.state_digest()
    edit = quick("rome", corpus, key_mode=mode).compute(h, REQ)
    assert h.state_digest() == before
    stats = edit.meta["stats"]
    (name,) = edit.deltas
    assert name == "transformer.h.1.mlp.c_proj.weight"
    assert stats["relative_norm"][name] > 0 and 0 < stats["division_factor"] <= 1
    assert edit.dense(name).shape == h.model.get_parameter(name).shape  # Conv1D [in, out] layout


def test_rome_subject_at_the_end_of_the_prompt(tiny_llama, corpus, home):
    req = EditRequest(prompt="The mother tongue is spoken by {}", subject="Danielle Darrieux", target_new="Paris")
    edit = quick("rome", corpus).compute(tiny_llama, req)
    assert edit.meta["stats"]["division_factor"] > 0


def test_rome_refuses_a_tiny_division_factor_and_leaves_the_model(tiny_llama, corpus, home):
    before = tiny_llama.state_digest()
    with pytest.raises(EditError, match="division factor"):
        quick("rome", corpus, min_division=1.01).compute(tiny_llama, REQ)  # |kᵀu|/‖k‖ ≤ 1 always
    assert tiny_llama.state_digest() == before


def test_nan_in_the_solve_is_refused(tiny_llama, corpus, home):
    S.second_moments(tiny_llama, [1], tokens=3000, corpus=corpus)
    store = next(v for k, v in tiny_llama.cache.items() if k[0] == S.CACHE_KEY)
    store[1] = torch.full_like(store[1], float("nan"))
    before = tiny_llama.state_digest()
    with pytest.raises(EditError, match="NaN"):
        quick("memit", corpus).compute(tiny_llama, REQ)
    assert tiny_llama.state_digest() == before


def test_alphaedit_key_cache_is_editor_state(tiny_llama, corpus, home):
    ed = quick("alphaedit", corpus)
    edit = ed.compute(tiny_llama, REQ)
    assert set(ed.state_dict()["kkt"]) == {"1"}
    assert list((home / "stats" / tiny_llama.fingerprint).glob("nullspace-layer1-*"))
    fresh = quick("alphaedit", corpus)
    assert fresh.state_dict()["kkt"] == {}  # never shared between editor objects
    fresh.load_state_dict(ed.state_dict())
    assert torch.equal(fresh.state_dict()["kkt"]["1"], ed.state_dict()["kkt"]["1"])
    with edit.applied(tiny_llama):
        ed.compute(tiny_llama, EditRequest(prompt="{} is in", subject="Tokyo", target_new="Japan"))
        two = ed.state_dict()["kkt"]["1"].clone()
        assert not torch.equal(two, fresh.state_dict()["kkt"]["1"])  # sequential: keys accumulate
    ed.compute(tiny_llama, REQ)  # edits reverted: the cache starts again from this edit alone
    assert torch.allclose(ed.state_dict()["kkt"]["1"], fresh.state_dict()["kkt"]["1"])
    ed.reset()
    assert ed.state_dict()["kkt"] == {}


@pytest.fixture
def tiny_gpt2_handle(tokenizer):
    return make_handle("gpt2", tokenizer)


def test_many_token_target_and_batch_of_requests(tiny_llama, corpus, home):
    long = EditRequest(prompt="{} was born in", subject="Barack Obama",
                       target_new="the University of Michigan at Trinity College")
    assert len(tiny_llama.tokens.target_ids(long.text, long.target_new)) > 8
    p = R.problem(tiny_llama, long, [["{}"]])
    assert len(p.labels) == len(tiny_llama.tokens.target_ids(long.text, long.target_new))
    edit = quick("memit", corpus).compute(tiny_llama, [REQ, long])
    (a, b), = edit.deltas.values()
    assert a.shape[1] == b.shape[1] == 2  # one rank per request


def test_value_cache_reuses_values_across_editors_and_runs(tiny_llama, corpus, home, tmp_path, monkeypatch):
    from lmedit.locate import pipeline

    calls = []
    real = pipeline.optimize_values

    def counting(handle, requests, *a, **kw):
        calls.append(len(requests))
        return real(handle, requests, *a, **kw)

    monkeypatch.setattr(pipeline, "optimize_values", counting)
    cache = tmp_path / "values"
    other = EditRequest(prompt="{} plays the", subject="Tom", target_new="violin")
    plain = quick("memit", corpus).compute(tiny_llama, [REQ, other])
    first = quick("memit", corpus, value_cache=str(cache)).compute(tiny_llama, [REQ])
    both = quick("memit", corpus, value_cache=str(cache)).compute(tiny_llama, [REQ, other])
    assert calls == [2, 1, 1]  # the second run optimised only the new request's value
    for name, (a, b) in both.deltas.items():  # same edit as without the cache
        # (computed alone, not in a batch of two: only the rounding differs)
        assert torch.allclose(a @ b.T, plain.deltas[name][0] @ plain.deltas[name][1].T, atol=1e-5)
    quick("emmet", corpus, value_cache=str(cache), clamp_norm_factor=4.0).compute(tiny_llama, [REQ, other])
    quick("memit", corpus, value_cache=str(cache), kl_factor=0.5).compute(tiny_llama, [REQ])  # other settings
    assert calls == [2, 1, 1, 0, 1]
    for entry in cache.rglob("*.pt"):
        entry.write_bytes(b"not a tensor file")
    quick("memit", corpus, value_cache=str(cache), kl_factor=0.5).compute(tiny_llama, [REQ])  # corrupt: again
    with first.applied(tiny_llama):  # other weights never meet the stored values
        quick("memit", corpus, value_cache=str(cache)).compute(tiny_llama, [REQ])
    assert calls == [2, 1, 1, 0, 1, 1, 1]


def test_values_stored_under_the_old_scope_name_are_found(tiny_llama, corpus, home, tmp_path, monkeypatch):
    from lmedit.locate import pipeline
    from lmedit.locate.value_store import ValueStore

    scopes, calls = [], []
    real_scope, real_opt = ValueStore.scope, pipeline.optimize_values
    monkeypatch.setattr(ValueStore, "scope", staticmethod(lambda *a: scopes.append(real_scope(*a)) or scopes[-1]))
    monkeypatch.setattr(pipeline, "optimize_values",
                        lambda handle, requests, *a, **kw: calls.append(len(requests)) or real_opt(handle, requests,
                                                                                                  *a, **kw))
    cache = tmp_path / "values"
    quick("memit", corpus, value_cache=str(cache)).compute(tiny_llama, [REQ])
    (new, old), = set(scopes)
    assert new.startswith("values-layer") and [p.name for p in cache.iterdir()] == [new]
    (cache / new).rename(cache / old)  # as a version before lmedit.io.cache_key left it
    quick("memit", corpus, value_cache=str(cache)).compute(tiny_llama, [REQ])
    assert calls == [1, 0], "the value stored under the old name was used"
    assert {p.name for p in cache.iterdir()} == {new, old}


def test_stats_cli_layer_parser():
    from lmedit.cli.stats import _layers

    assert _layers("3-7") == [3, 4, 5, 6, 7] and _layers("3,5") == [3, 5]


# --- layers = "auto" ----------------------------------------------------------------------------------------
def test_layers_auto_uses_the_causal_tracing_peak(tiny_llama, monkeypatch):
    import numpy as np

    from lmedit import get_editor
    from lmedit.tracing import AverageEffect, LayerSuggestion

    n = tiny_llama.n_layers
    effects = np.zeros((6, n))
    effects[2] = [0.1, 0.2, 0.9, 0.3][:n]  # row 2: the last subject token; peak at layer 2
    avg = AverageEffect(kind="mlp", window=2, samples=2, effects=effects, scores=effects, counts=[1] * 6,
                        n_facts=3, n_skipped=0, mean_high=0.5, mean_low=0.1, fact_ids=[0, 1, 2])
    calls = []
    monkeypatch.setattr("lmedit.tracing.suggest_layers",
                        lambda handle, **kw: calls.append(kw) or LayerSuggestion(int(np.argmax(effects[2])), avg))
    assert get_editor("rome", layers="auto").config_for(tiny_llama).layers == [2]
    got = get_editor("memit", layers="auto").config_for(tiny_llama).layers
    assert len(got) == min(5, n) and got == list(range(got[0], got[0] + len(got)))
    assert 2 in got and len(calls) == 2
    with pytest.raises(ConfigError):
        get_editor("rome", layers="middle")
