"""A prompt longer than the model's context is edited with a warning that says so (issue 15, defect 7)."""

from __future__ import annotations

import logging

from lmedit import get_editor
from lmedit.types import EditRequest


def test_prompt_longer_than_the_context_is_warned_about(tiny_llama, caplog):
    limit = tiny_llama.model.config.max_position_embeddings
    long = EditRequest(prompt="The capital " * limit + "of {} is", subject="France", target_new="Rome")
    with caplog.at_level(logging.WARNING, logger="lmedit"):
        get_editor("ft-m", steps=1)._check_requests(tiny_llama, [long])
    assert any("longer than the model's context" in r.getMessage() and str(limit) in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmedit"):
        get_editor("ft-m", steps=1)._check_requests(tiny_llama, [EditRequest("The capital of {} is", "France", "Rome")])
    assert not caplog.records
