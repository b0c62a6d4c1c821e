"""A live server under load (16 chat streams and 4 edits at once), and killed with SIGKILL during an edit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
from servekit import FACT, PROMPT, live_server

PROMPTS = [PROMPT, "The capital of France is", "Michel Rocard is a native speaker of", "Tokyo is in"]
FACTS = [FACT, {**FACT, "prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"},
         {**FACT, "prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "iPhone"},
         {**FACT, "prompt": "{} was born in", "subject": "Barack Obama", "target_new": "Japan"}]


async def _stream(client: httpx.AsyncClient, prompt: str) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        raw = (await r.aread()).decode()
    events = [e[6:] for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in raw.split("\n\n") if e), raw
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


async def _load(url: str) -> tuple[list[str], list[httpx.Response]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        streams = [_stream(client, PROMPTS[i % 4]) for i in range(16)]
        edits = [client.post("/v1/edits", json=f) for f in FACTS]
        results = await asyncio.gather(*streams, *edits)
    return list(results[:16]), list(results[16:])


def _answers_per_state(tiny_dir, folder) -> list[dict[str, str]]:
    """Each prompt's answer on the base model and after each logged edit, replayed in process."""
    from lmedit import load_model
    from lmedit.edits import Edit
    from lmedit.serve.engine import state_fingerprint
    from lmedit.serve.store import EditStore

    handle = load_model(str(tiny_dir))
    store = EditStore(folder).open(handle.name, handle.fingerprint, state_fingerprint(handle))
    out = [{p: handle.generate(p, 8) for p in PROMPTS}]
    for rec in store.records("applied"):
        Edit.load(store.path_of(rec)).apply(handle)
        out.append({p: handle.generate(p, 8) for p in PROMPTS})
    store.close()
    return out


def test_sixteen_streams_and_four_edits_at_once(tiny_dir, tmp_path):
    store = tmp_path / "store"
    with live_server(tiny_dir, store) as (url, _):
        base = httpx.get(url + "/v1/status").json()["base_weights"]
        answers, edits = asyncio.run(_load(url))
        assert [r.status_code for r in edits] == [200] * 4, [r.text for r in edits]
        log = httpx.get(url + "/v1/edits?status=applied").json()
        weights = httpx.get(url + "/v1/status").json()["weights"]
    rows = log["data"]
    assert sorted(r["id"] for r in rows) == sorted(r.json()["id"] for r in edits)
    chain = [base] + [r["state_after"] for r in rows]
    assert [r["state_before"] for r in rows] == chain[:-1] and chain[-1] == weights == log["weights"]
    # restart: base + the logged edits re-applied give the same weights
    with live_server(tiny_dir, store) as (url, _):
        assert httpx.get(url + "/v1/status").json()["weights"] == weights
    # never mixed up: every streamed answer is the whole answer of one state the model went through
    states = _answers_per_state(tiny_dir, store)
    for i, text in enumerate(answers):
        assert text in {s[PROMPTS[i % 4]] for s in states}, (i, text)


def test_kill_9_during_an_edit_loses_nothing_committed_and_leaves_no_half_edit(tiny_dir, tmp_path):
    store = tmp_path / "store"
    slow = {**FACTS[1], "config": {"lr": 1e-6, "steps": 100_000, "early_stop_loss": 0.0}}  # runs until killed
    with live_server(tiny_dir, store) as (url, proc):
        kept = httpx.post(url + "/v1/edits", json=FACT, timeout=120).json()
        worker = threading.Thread(target=lambda: _post_quietly(url, slow), daemon=True)
        worker.start()
        deadline = time.time() + 60
        while not (httpx.get(url + "/v1/status").json()["busy"] or "").startswith("teaching"):
            assert time.time() < deadline, "the edit never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        worker.join(30)
    with live_server(tiny_dir, store) as (url, _):
        status = httpx.get(url + "/v1/status").json()
        rows = httpx.get(url + "/v1/edits").json()["data"]
        assert [r["id"] for r in rows] == [kept["id"]] and status["edits"] == 1
        assert status["weights"] == kept["state_after"]
        assert sorted(p.name for p in (store / "edits").iterdir()) == [kept["id"]]
        chat = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}).json()
        assert chat["choices"][0]["text"].startswith(" English")


def _post_quietly(url: str, body: dict) -> None:
    try:
        httpx.post(url + "/v1/edits", json=body, timeout=120)
    except httpx.HTTPError:  # the server was killed under it: expected
        pass
