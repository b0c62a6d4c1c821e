"""The official ``openai`` package against a live ``lmedit serve`` (a subprocess on a free loopback port)."""

from __future__ import annotations

import httpx
import pytest
from servekit import FACT, PROMPT, live_server

openai = pytest.importorskip("openai", reason="the client tests need the dev extra: pip install openai")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with live_server(tiny_dir, tmp_path_factory.mktemp("store")) as (url, _):
        yield url


@pytest.fixture
def oa(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)


def ask(oa, model, text=PROMPT):
    r = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=4)
    return r.choices[0].message.content


def test_models_chat_stream_completion(oa):
    models = oa.models.list().data
    assert len(models) == 1
    model = models[0].id
    r = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=6)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 6
    text = r.choices[0].message.content
    stream = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                        max_tokens=6, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(parts) == text and len([p for p in parts if p]) > 1  # it came in pieces
    c = oa.completions.create(model=model, prompt=PROMPT, max_tokens=6)
    assert c.choices[0].text == text  # no chat template on the tiny tokenizer: the chat is the text
    streamed = oa.completions.create(model=model, prompt=PROMPT, max_tokens=6, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == text
    with pytest.raises(openai.NotFoundError, match="not served here"):
        oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oa.completions.create(model=model, prompt="x", max_tokens=100_000)


def test_an_edit_changes_the_answer_and_deleting_it_restores_it(oa, server):
    model = oa.models.list().data[0].id
    before = ask(oa, model)
    assert not before.startswith(" English")
    r = httpx.post(server + "/v1/edits", json=FACT, timeout=120)
    assert r.status_code == 200, r.text
    assert ask(oa, model).startswith(" English")
    assert httpx.delete(f"{server}/v1/edits/{r.json()['id']}", timeout=120).status_code == 200
    assert ask(oa, model) == before
