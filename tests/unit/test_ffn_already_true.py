"""The FFN editors on a request whose target is already the model's answer: a warning, an edit, a flag."""

from __future__ import annotations

import logging

import pytest
import torch

from lmedit import get_editor
from lmedit.registry import editor_class
from lmedit.types import EditRequest


def _greedy_request(handle) -> EditRequest:
    prompt = "The capital of France is"
    ids = handle.tokens.prompt_ids(prompt)
    with torch.no_grad():
        nxt = int(handle.model(torch.tensor([ids])).logits[0, -1].argmax())
    word = handle.tokenizer.decode([nxt]).strip()
    req = EditRequest(prompt=prompt, subject="France", target_new=word, case_id=7)
    assert handle.tokens.target_ids(prompt, word) == [nxt], "the greedy token must round-trip as a spaced target"
    return req


@pytest.mark.parametrize("method", ["kn", "calinet", "t-patcher"])
def test_target_that_is_already_the_answer_is_flagged(tiny_llama, request_darrieux, method, tmp_path, monkeypatch,
                                                       caplog):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path))
    editor = get_editor(method, **editor_class(method).quick)
    before = tiny_llama.state_digest()
    with caplog.at_level(logging.WARNING):
        edit = editor.compute(tiny_llama, _greedy_request(tiny_llama))
    assert "already predicts" in caplog.text
    flag = edit.meta["stats"]["already_true"]
    assert flag == [7] if method == "calinet" else flag is True
    assert tiny_llama.state_digest() == before  # compute never touches the model
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        edit = editor.compute(tiny_llama, request_darrieux)  # "English" is not the tiny model's answer
    assert "already predicts" not in caplog.text
    assert not edit.meta["stats"]["already_true"]
