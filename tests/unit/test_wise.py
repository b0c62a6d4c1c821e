"""WISE: routing between side and main memory, knowledge sharding and TIES merging, and undo of any edit.

"Exact" checks compare logits with torch.equal against the model that never had the deleted edit.
"""

from __future__ import annotations

import pytest
import torch
from test_lifelong import logits, logits_with  # logits of fixed probes; of a model with given edits

from conftest import make_handle
from lmedit.edits import Edit, EditMismatchError
from lmedit.hooks import get_module, trace
from lmedit.methods._wise_memory import WiseLayer, shard_mask, ties_merge
from lmedit.methods.wise import IRRELEVANT
from lmedit.registry import editor_class, get_editor
from lmedit.types import EditRequest

REQS = [
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
    EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome"),
    EditRequest(prompt="{} was born in", subject="Barack Obama", target_new="Tokyo"),
    EditRequest(prompt="{} plays the", subject="Yo-Yo Ma", target_new="piano"),
    EditRequest(prompt="The author of {} is", subject="Hamlet", target_new="Dickens"),
]
SHARDED = {"shard_size": 2, "merge_every": 2}  # shards of two edits, merged in pairs


def wise(**kw):
    return get_editor("wise", **{**editor_class("wise").quick, **kw})


@pytest.fixture
def llama(tokenizer):
    return make_handle("llama", tokenizer)


def layer_of(handle, edit) -> WiseLayer:
    layer = get_module(handle.model, edit.path)
    assert isinstance(layer, WiseLayer)
    return layer


@torch.no_grad()
def routes(handle, layer: WiseLayer, text: str, answer: str | None = None) -> torch.Tensor:
    """Per token of ``text`` (+ ``answer``): the side memory index the layer picks (-1: main memory)."""
    batch = (handle.tokens.teacher_forced([text], [answer]) if answer
             else handle.tokens.teacher_forced([text], ["x"]))
    with trace(handle.model, _path(handle, layer), input=True, output=True) as t:
        handle.model(**batch.model_inputs(handle.device))
    out = layer.base(t.input)
    return layer.route(t.input, out)[1][0]


def _path(handle, layer) -> str:
    return next(n for n, m in handle.model.named_modules() if m is layer)


def test_edit_prompt_takes_side_memory_and_unrelated_text_main(llama):
    edit = wise().compute(llama, REQS[0]).apply(llama)
    layer = layer_of(llama, edit)
    batch = llama.tokens.teacher_forced([REQS[0].text], [REQS[0].target_new])
    edited = routes(llama, layer, REQS[0].text, REQS[0].target_new)
    answer_positions = batch.pred_positions(0)
    assert (edited[answer_positions] == 0).all(), edited  # the positions that predict the answer: side memory
    for text in [*IRRELEVANT[:4], "Tokyo is in Japan"]:
        unrelated = routes(llama, layer, text)
        assert (unrelated == -1).float().mean() >= 0.9, (text, unrelated)
    edit.revert(llama)


def test_unrelated_windows_of_wikitext_join_the_built_in_sentences(llama):
    from lmedit.config import ConfigError
    from lmedit.data.paths import find_data_file
    from lmedit.methods.wise import _windows

    try:
        find_data_file("corpus/wikitext-2_valid.tokens.txt")
    except FileNotFoundError:
        pytest.skip("WikiText-2 valid split not found (../shared/data)")
    a = _windows(llama, REQS[0].text, 3)
    assert a == _windows(llama, REQS[0].text, 3) and a != _windows(llama, REQS[1].text, 3)  # seeded by the edit
    assert len(a) == 3 and all(len(w) == len(llama.tokens.bos) + 64 for w in a)
    plain = wise().compute(llama, REQS[0]).meta["stats"]["unrelated_tokens"]
    edit = wise(unrelated_windows=2).compute(llama, REQS[0])
    assert edit.meta["stats"]["unrelated_tokens"] == plain + 2 * (len(llama.tokens.bos) + 64)
    with pytest.raises(ConfigError, match="unrelated_windows must be ≥ 0"):
        wise(unrelated_windows=-1)


def test_training_routes_as_inference(llama):
    # an edit trains through the side memory only where the layer will route to it at inference (its answer
    # positions, and positions whose Δ reaches the shard's threshold): with the shard's τ and threshold and no
    # new values, the training stand-in gives the layer's own output at every position
    from lmedit.methods.wise import _Training

    edit = wise().compute(llama, REQS[0]).apply(llama)
    layer = layer_of(llama, edit)
    (tau, theta), = layer.memories()
    batch = llama.tokens.teacher_forced([REQS[0].text, *IRRELEVANT[:3]], [REQS[0].target_new, "x", "x", "x"])
    with torch.no_grad(), trace(llama.model, edit.path, input=True, output=False) as t:
        llama.model(**batch.model_inputs(llama.device))
    x = t.input
    stand_in = _Training(layer.base, tau, shard_mask(edit.sharding.mask_seed(0), layer.shape, 0.2), layer.act,
                         torch.zeros(x.shape[:-1], dtype=torch.bool))
    stand_in.theta = theta
    routed, choice = layer.route(x, layer.base(x))
    assert 0 < int((choice == 0).sum()) < choice.numel()  # both memories are used: the test can tell them apart
    assert torch.allclose(stand_in(x).float(), routed, atol=1e-6)
    edit.revert(llama)


def test_later_edits_of_a_shard_replay_the_earlier_ones(llama, tmp_path):
    # each edit trains the shard's earlier edits' prompts and answers again (at most `replay` of them), so its
    # routing statistic -- hence the shard's threshold -- covers them on the τ they now share
    editor, edits = wise(replay=2), []
    for r in REQS[:4]:
        edits.append(editor.compute(llama, r).apply(llama))
    assert [e.meta["stats"]["replayed"] for e in edits] == [0, 1, 2, 2]
    assert edits[0].replay == (REQS[0].text, REQS[0].target_new)
    layer = layer_of(llama, edits[0])
    assert layer.replay_rows(0) == [e.replay for e in edits]
    for r in REQS[:4]:
        batch = llama.tokens.teacher_forced([r.text], [r.target_new])
        assert (routes(llama, layer, r.text, r.target_new)[batch.pred_positions(0)] == 0).all(), r
    # the threshold: act_ratio × the statistics no later edit replayed (here only the newest edit's)
    (_, theta), = layer.memories()
    assert theta == pytest.approx(edits[3].act * edits[3].sharding.act_ratio)
    edits[3].save(tmp_path / "e")
    loaded = Edit.load(tmp_path / "e")
    assert (loaded.replay, loaded.replayed) == (edits[3].replay, 2)
    edits[3].revert(llama)  # edit 2 replayed edits 0 and 1: its statistic is the threshold again
    assert layer.memories()[0][1] == pytest.approx(edits[2].act * edits[2].sharding.act_ratio)
    edits[3].apply(llama)
    for e in reversed(edits):
        e.revert(llama)
    none = wise(replay=0)
    a = none.compute(llama, REQS[0]).apply(llama)
    assert none.compute(llama, REQS[1]).meta["stats"]["replayed"] == 0
    a.revert(llama)


def test_shards_fill_then_merge(llama):
    editor, edits = wise(**SHARDED), []
    for i, r in enumerate(REQS):
        edits.append(editor.compute(llama, r).apply(llama))
        layer = layer_of(llama, edits[0])
        n = i + 1
        assert edits[-1].shard == i // 2
        # memories: one merged group once shards 0 and 1 are full, plus each unmerged shard
        want = (1 if n >= 4 else (n + 1) // 2) + (1 if n == 5 else 0)
        assert len(layer.memories()) == want, (n, layer.groups())
    assert [done for _, done in layer.groups()] == [True, False]
    masks = [set(shard_mask(edits[0].sharding.mask_seed(s), edits[0].shape, 0.2).tolist()) for s in (0, 1)]
    assert masks[0] != masks[1] and len(masks[0] & masks[1]) < 0.3 * len(masks[0])  # independent: ≈ ρ = 0.2
    for e in reversed(edits):
        e.revert(llama)
    assert not isinstance(get_module(llama.model, edits[0].path), WiseLayer)


def test_ties_merge():
    a = torch.tensor([[1.0, 0.0, 2.0, -1.5]])
    b = torch.tensor([[3.0, 4.0, 0.0, 2.0]])
    merged = ties_merge([a, b], density=1.0)
    # agreeing signs average, a lone value stays, a sign conflict keeps the elected (larger-sum) side
    assert torch.equal(merged, torch.tensor([[2.0, 4.0, 2.0, 2.0]]))
    trimmed = ties_merge([a], density=0.5)  # the two largest magnitudes survive
    assert torch.equal(trimmed, torch.tensor([[0.0, 0.0, 2.0, -1.5]]))


def test_undo_an_edit_of_the_open_shard_is_exact(llama):
    editor = wise()
    a = editor.compute(llama, REQS[0]).apply(llama)
    b = editor.compute(llama, REQS[1]).apply(llama)
    assert a.shard == b.shard == 0
    a.revert(llama)  # from under b (order-free)
    without_a = logits(llama)
    b.revert(llama)
    assert torch.equal(without_a, logits_with(llama, [b]))
    assert not isinstance(get_module(llama.model, a.path), WiseLayer)


def test_undo_an_edit_of_a_merged_shard_rebuilds_the_merge(llama):
    editor = wise(**SHARDED)
    edits = [editor.compute(llama, r).apply(llama) for r in REQS[:4]]
    layer = layer_of(llama, edits[0])
    assert [done for _, done in layer.groups()] == [True]
    merged = logits(llama)
    edits[1].revert(llama)  # shard 0 keeps one edit; the merge is recomputed from what remains
    assert [done for _, done in layer.groups()] == [True]
    rebuilt = logits(llama)
    assert not torch.equal(rebuilt, merged)
    for e in reversed([edits[0], *edits[2:]]):
        e.revert(llama)
    assert torch.equal(rebuilt, logits_with(llama, [edits[0], *edits[2:]]))


def test_edit_with_other_sharding_settings_is_refused(llama, tmp_path):
    a = wise().compute(llama, REQS[0]).apply(llama)
    b = wise(shard_size=7).compute(llama, REQS[1])
    before = logits(llama)
    with pytest.raises(EditMismatchError, match="sharding"):
        b.apply(llama)
    assert torch.equal(logits(llama), before)
    a.revert(llama)
    a.save(tmp_path / "a")
    loaded = Edit.load(tmp_path / "a")
    assert loaded.meta["model_fingerprint"] == llama.fingerprint and torch.equal(loaded.values, a.values)


@pytest.mark.slow
def test_wise_raises_target_probability_on_smollm2(smollm2):
    from lmedit.metrics.scoring import score_targets

    req = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="Japanese")
    unrelated = ("The capital of Italy is", "Rome")
    before = score_targets(smollm2, [req.text, unrelated[0]], [req.target_new, unrelated[1]])
    edit = get_editor("wise", steps=25, templates=0).compute(smollm2, req)
    with edit.applied(smollm2):
        after = score_targets(smollm2, [req.text, unrelated[0]], [req.target_new, unrelated[1]])
    assert after[0].nll < before[0].nll - 1.0, (before[0].nll, after[0].nll)
    assert after[1].nll == pytest.approx(before[1].nll, abs=1e-4)  # routed to the main memory
