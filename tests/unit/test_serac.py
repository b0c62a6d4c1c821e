"""SERAC: routing (out-of-scope rows see the base model bit for bit, in-scope rows the counterfactual model),
the memory (grows with stacked edits, listed, pruned, saved), and the model's state dict while applied."""

from __future__ import annotations

import pytest
import torch
from test_mend import CASES, REQ

from conftest import make_handle
from lmedit.edits import Edit
from lmedit.registry import get_editor
from lmedit.types import EditInputError, EditRequest

OTHER = "Tokyo is in"


@pytest.fixture(scope="module")
def fitted(tokenizer):
    handle = make_handle("llama", tokenizer)
    handle.cache = {}
    editor = get_editor("serac", **{**get_editor("serac").quick, "cf_rank": 0})
    editor.fit(handle, CASES, quick=True, steps=30)
    return editor, handle


@torch.no_grad()
def logits(handle, prompts, answers):
    return handle.logits(handle.tokens.teacher_forced(prompts, answers))


def test_routing_base_for_out_of_scope_and_context_for_in_scope(fitted):
    editor, handle = fitted
    base = logits(handle, [REQ.text, OTHER], ["English", "Japan"])
    edit = editor.compute(handle, [REQ])
    router = next(iter(edit.modules.values()))
    with edit.applied(handle):
        assert router.route([REQ.text + " English", OTHER + " Japan"]) == [0, -1]
        routed = logits(handle, [REQ.text, OTHER], ["English", "Japan"])
    assert torch.equal(routed[1], base[1])  # out of scope: the untouched base model
    ctx = f"{REQ.text} English\n"
    cf = logits(handle, [ctx + REQ.text], ["English"])  # the base model reading the edit in context
    n = len(handle.tokens.prompt_ids(REQ.text)) + len(handle.tokens.target_ids(REQ.text, "English")) - 1
    ctx_len = cf.shape[1] - n
    assert torch.allclose(routed[0, 1 : n + 1], cf[0, ctx_len:], atol=1e-4)


def test_memory_grows_lists_prunes_and_saves(fitted, tmp_path):
    editor, handle = fitted
    a = editor.compute(handle, [REQ]).apply(handle)
    b = editor.compute(handle, [CASES[1].request]).apply(handle)
    outer = next(iter(b.modules.values()))
    assert [e["case_id"] for e in outer.entries()] == [1, 0]
    assert outer.route([CASES[1].request.text, REQ.text]) == [0, 1]
    keys = set(handle.model.state_dict())
    b.revert(handle)
    a.revert(handle)
    assert keys == set(handle.model.state_dict())  # the wrapper does not rename the model's tensors
    b.save(tmp_path / "b")
    loaded = Edit.load(tmp_path / "b")
    router = next(iter(loaded.modules.values()))
    assert router.entries() == [{"prompt": CASES[1].request.text, "target": "Rome", "subject": "France", "case_id": 1}]
    assert router.prune(lambda e: e["case_id"] != 1) == 1 and router.entries() == []
    with loaded.applied(handle):
        assert torch.equal(logits(handle, [OTHER], ["Japan"]), logits_base(handle))


def logits_base(handle):
    return logits(handle, [OTHER], ["Japan"])


def test_generation_follows_the_routing(fitted):
    editor, handle = fitted
    base_other = handle.generate(OTHER, max_new_tokens=4)
    with editor.compute(handle, [REQ]).applied(handle):
        assert handle.generate(OTHER, max_new_tokens=4) == base_other
        edited = handle.generate(REQ.text, max_new_tokens=4)
    ctx_gen = handle.generate(f"{REQ.text} English\n{REQ.text}", max_new_tokens=4)
    assert edited == ctx_gen


def test_encoder_decoder_is_refused(tokenizer):
    t5 = make_handle("t5", tokenizer)
    with pytest.raises(EditInputError, match="encoder-decoder"):
        get_editor("serac").compute(t5, [EditRequest("The capital of {} is", "France", "Rome")])


def test_threshold_is_a_use_time_option(fitted):
    editor, handle = fitted
    strict = get_editor("serac", threshold=0.999999)
    strict.load_state_dict(editor.state_dict())
    router = next(iter(strict.compute(handle, [REQ]).modules.values()))
    assert router.threshold == 0.999999
    router.bind(handle)
    assert router.route([REQ.text + " English"]) == [-1]  # nothing is that certain: the base model answers


def _greedy_whole(handle, prompt, steps, ends):
    """Greedy continuation by full forwards (no cache): what a batch must reproduce row by row."""
    ids = handle.tokens.prompt_ids(prompt)
    new = []
    for _ in range(steps):
        nxt = int(handle.model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1].argmax())
        if nxt in ends:
            break
        new.append(nxt)
    return new


@torch.no_grad()
def test_batched_generation_sees_whole_rows(fitted, monkeypatch):
    """lmedit's generation drops finished rows from its batch and runs long common beginnings once; under
    SERAC every forward must still read each row's whole text, so a batch (rows finishing at different steps,
    a shared 20-token beginning) generates what each prompt generates alone by full forwards."""
    from lmedit.metrics import generate as gen

    editor, handle = fitted
    long = "Answer in one word, the way an atlas would, and do not explain: "
    prompts = [REQ.text, OTHER, long + REQ.text, long + OTHER, "The official language of France is"]
    with editor.compute(handle, [REQ]).applied(handle):
        free = [_greedy_whole(handle, p, 6, set()) for p in prompts]
        end = free[0][2]  # this token ends the first row after two tokens: it leaves the batch early
        monkeypatch.setattr(gen, "stop_ids", lambda _h: {end})
        want = [_greedy_whole(handle, p, 6, {end}) for p in prompts]
        got = gen.generate_texts(handle, prompts, max_new_tokens=6, stop_at_newline=False)
    assert len({len(w) for w in want}) > 1  # rows do finish at different steps
    assert [g.text for g in got] == [handle.tokenizer.decode(w, skip_special_tokens=True) for w in want]
