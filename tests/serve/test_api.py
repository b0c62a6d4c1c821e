"""Every route and its errors, in process (FastAPI's TestClient) on a tiny Llama."""

from __future__ import annotations

import base64
import json

import pytest
import servekit
from servekit import FACT, PROMPT, tiny_engine

from lmedit.serve.app import check_bind, create_app

client = servekit.client
engine = servekit.engine  # fixtures (a conftest.py here would shadow tests/conftest.py)


def complete(client, prompt=PROMPT, **kw):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def error(r, status: int, match: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert match in body["message"], body["message"]
    assert body["code"] == status


def events(text: str) -> list[dict]:
    chunks = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def test_page_status_models_methods(client):
    page = client.get("/")
    assert page.status_code == 200 and "lmedit playground" in page.text and "teach-submit" in page.text
    status = client.get("/v1/status").json()
    assert status["model"] == "tiny-llama" and status["edits"] == 0 and status["busy"] is None
    assert status["weights"] == status["base_weights"]
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"] and models["object"] == "list"
    methods = client.get("/v1/methods").json()
    names = {m["name"] for m in methods["data"]}
    assert {"rome", "ft-m", "ike"} <= names and "mend" not in names and methods["default"] == "ft-m"
    ftm = next(m for m in methods["data"] if m["name"] == "ft-m")
    assert any(f["name"] == "lr" and f["help"] for f in ftm["config"]) and ftm["edit_kind"] == "weight_delta"


def test_chat_and_completion_plain_and_streamed(client):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5}
    r = client.post("/v1/chat/completions", json=body).json()
    text = r["choices"][0]["message"]["content"]
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 5
    # no chat template on the tiny tokenizer: the chat continues the message's text, as a completion does
    assert complete(client, max_tokens=5) == text
    s = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert s.headers["content-type"].startswith("text/event-stream")
    chunks = events(s.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "chat.completion.chunk"
    c = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "stream": True})
    assert "".join(ch["choices"][0]["text"] for ch in events(c.text)) == text


def test_sampling_is_accepted(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 1.0, "top_p": 0.9})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("path,body,status,match", [
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404,
     "serves 'tiny-llama'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 513}, 400,
     "between 1 and 512"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * 300, "max_tokens": 5}, 400, "window"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/edits", {**FACT, "method": "nope"}, 400, "unknown editing method"),
    ("/v1/edits", {**FACT, "method": "mend"}, 400, "needs a trained checkpoint"),
    ("/v1/edits", {**FACT, "config": {"lrr": 1}}, 400, "lrr"),
    ("/v1/edits", {**FACT, "config": {"checkpoint": "/tmp/x"}}, 400, "names a file"),
    ("/v1/edits", {**FACT, "prompt": "The capital is"}, 400, "does not occur in prompt"),
    ("/v1/edits", {**FACT, "target_new": " "}, 400, "target_new is empty"),
    ("/v1/trace", {"prompt": PROMPT, "subject": "Danielle Darrieux", "kind": "x", "noise": 0.1}, 400, "kind"),
    ("/v1/trace", {"prompt": PROMPT, "subject": "Nobody", "noise": 0.1}, 400, "Nobody"),
    ("/v1/trace", {"prompt": PROMPT, "subject": "Danielle Darrieux", "samples": 99}, 400, "samples"),
])
def test_bad_requests_get_a_4xx_that_says_what_to_fix(client, engine, path, body, status, match):
    state = engine.state
    error(client.post(path, json=body), status, match)
    assert engine.state == state and not engine.applied()


def test_bodies_are_bounded(client):
    error(client.post("/v1/completions", content=b"x" * (65 * 1024), headers={"content-type": "application/json"}),
          413, "over 65536 bytes")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(70):
            yield b" " * 1024

    error(client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
          413, "over 65536 bytes")


def test_teach_list_get_undo_export_import(client, engine):
    before = complete(client)
    r = client.post("/v1/edits", json={**FACT, "paraphrase": "Danielle Darrieux speaks",
                                       "neighbour": "The capital of France is"})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["status"] == "applied" and rec["method"] == "ft-m" and "folder" not in rec
    assert [c["label"] for c in rec["report"]["continuations"]] == ["prompt", "paraphrase", "neighbour"]
    assert {"reliability", "generalization", "locality"} <= set(rec["report"]["scores"])
    assert rec["report"]["efficiency"]["seconds"] > 0 and rec["weights"] == engine.state
    assert complete(client).startswith(" English")
    listed = client.get("/v1/edits").json()["data"]
    assert [e["id"] for e in listed] == [rec["id"]]
    assert client.get(f"/v1/edits/{rec['id']}").json()["requests"][0]["target_new"] == "English"
    error(client.get("/v1/edits/0123456789ab"), 404, "no edit")
    error(client.get("/v1/edits/..etc"), 404, "12 hex digits")
    error(client.get("/v1/edits/..%2F..%2Fetc%2Fpasswd/export"), 404, "Not Found")

    doc = client.get(f"/v1/edits/{rec['id']}/export")
    assert doc.status_code == 200 and "attachment" in doc.headers["content-disposition"]
    assert doc.json()["format"] == "lmedit.edit/1" and doc.json()["tensors"]

    undone = client.delete(f"/v1/edits/{rec['id']}").json()
    assert undone["status"] == "undone" and complete(client) == before
    error(client.delete(f"/v1/edits/{rec['id']}"), 409, "already undone")
    assert client.get("/v1/edits?status=applied").json()["data"] == []
    assert len(client.get("/v1/edits?status=undone").json()["data"]) == 1

    imported = client.post("/v1/edits/import", content=doc.content)
    assert imported.status_code == 200, imported.text
    assert imported.json()["source"] == "import" and complete(client).startswith(" English")
    assert imported.json()["weights"] == rec["weights"]  # the same edit on the same weights
    out = client.delete("/v1/edits").json()
    assert out["undone"] == [imported.json()["id"]] and complete(client) == before
    assert client.delete("/v1/edits").json()["undone"] == []


def test_imports_are_checked(client, engine):
    rec = client.post("/v1/edits", json=FACT).json()
    doc = client.get(f"/v1/edits/{rec['id']}/export").json()
    client.delete("/v1/edits")
    state = engine.state

    def bad(mutate, status, match):
        d = json.loads(json.dumps(doc))
        mutate(d)
        error(client.post("/v1/edits/import", content=json.dumps(d)), status, match)
        assert engine.state == state

    bad(lambda d: d.update(format="other"), 400, "not an exported edit")
    bad(lambda d: d["edit"]["meta"].update(model_fingerprint="0" * 16), 400, "made for model fingerprint")
    bad(lambda d: d["edit"]["meta"].pop("model_fingerprint"), 400, "made for model fingerprint")
    bad(lambda d: d["edit"].update(kind="python_object"), 400, "cannot be imported")
    bad(lambda d: d.update(tensors="%%%"), 400, "not valid base64")
    bad(lambda d: d.update(tensors=base64.b64encode(b"not safetensors").decode()), 400, "cannot be read")
    error(client.post("/v1/edits/import", content=b"{not json"), 400, "not JSON")


def test_trace_returns_a_heatmap(client):
    r = client.post("/v1/trace", json={"prompt": PROMPT, "subject": "Danielle Darrieux", "kind": "mlp",
                                       "samples": 2, "noise": 0.1})
    assert r.status_code == 200, r.text
    t = r.json()
    assert len(t["scores"]) == len(t["tokens"]) and len(t["scores"][0]) == 4
    b, e = t["subject_range"]
    assert "".join(t["tokens"][b:e]).strip() == "Danielle Darrieux"


def test_api_key_host_and_origin(tmp_path):
    from fastapi.testclient import TestClient

    eng = tiny_engine(tmp_path / "s")
    app = create_app(eng, api_key="s3cret", allowed_hosts={"testserver"})
    with TestClient(app) as c:
        error(c.get("/v1/models"), 401, "API key")
        error(c.get("/"), 401, "API key")
        error(c.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401, "API key")
        assert c.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        login = c.get("/?key=s3cret", follow_redirects=False)
        assert login.status_code == 303 and "HttpOnly" in login.headers["set-cookie"]
        assert c.get("/v1/status").status_code == 200  # the cookie now
        error(c.get("/v1/status", headers={"host": "evil.example"}), 403, "not this server's")
        error(c.post("/v1/completions", json={"prompt": "x"}, headers={"origin": "http://evil.example"}),
              403, "refused")
    eng.close()
    with pytest.raises(ValueError, match="--api-key"):
        check_bind("0.0.0.0", None)
    assert check_bind("0.0.0.0", "k") is None and "localhost" in check_bind("127.0.0.1", None)


def test_the_cli_refuses_a_public_address_without_a_key_before_loading_anything(capsys, monkeypatch):
    from lmedit.cli import main

    monkeypatch.delenv("LMEDIT_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--model", "/nonexistent"]) == 1
    assert "give --api-key KEY" in capsys.readouterr().err
