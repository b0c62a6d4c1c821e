"""The FastAPI app: the playground page, the OpenAI-compatible API and the edit API.

Routes (every error is ``{"error": {"message", "type", "code"}}`` with a 4xx status):

    GET  /                         the playground page (static/index.html)
    GET  /v1/models                the served model (OpenAI format)
    POST /v1/chat/completions      chat, ``stream`` for server-sent events
    POST /v1/completions           plain-text continuation, ``stream`` too
    POST /v1/edits                 teach a fact; GET /v1/edits lists the log; DELETE /v1/edits undoes all
    GET|DELETE /v1/edits/{id}      one edit; DELETE undoes it
    GET  /v1/edits/{id}/export     the edit as one JSON document; POST /v1/edits/import applies one
    GET  /v1/methods, /v1/status   what the page needs; POST /v1/trace a causal-trace heatmap
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ConfigError
from ..edits import EditError
from ..registry import UnknownMethodError
from ..types import EditInputError, EditRequest
from .engine import Engine, Generation
from .errors import BadRequest, NotFound, ServeError, TooBusy
from .security import LOOPBACK_HOSTS, Guard, is_loopback
from .teach import TeachSpec

log = logging.getLogger(__name__)

ID = re.compile(r"^[0-9a-f]{12}$")
TEXT = 8_000  # longest text field, in characters


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=TEXT)


class Sampling(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=64)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(Sampling):
    prompt: str = Field(max_length=TEXT)


class EditBody(BaseModel):
    prompt: str = Field(max_length=1000, description="the prompt, with the subject in it or a {} where it goes")
    subject: str = Field(max_length=200)
    target_new: str = Field(max_length=200)
    target_true: str | None = Field(None, max_length=200)
    method: str | None = Field(None, max_length=40)
    config: dict[str, Any] = Field(default_factory=dict)
    paraphrase: str | None = Field(None, max_length=1000)
    neighbour: str | None = Field(None, max_length=1000)
    neighbour_answer: str | None = Field(None, max_length=200)
    max_new_tokens: int = Field(12, ge=1, le=64)


class TraceBody(BaseModel):
    prompt: str = Field(max_length=1000)
    subject: str = Field(max_length=200)
    kind: str = "mlp"
    samples: int = 5
    noise: float | None = Field(None, gt=0, le=100)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def model_id(engine: Engine) -> str:
    return engine.handle.name.rstrip("/").rsplit("/", 1)[-1]


def create_app(engine: Engine, *, api_key: str | None = None, allowed_hosts: set[str] | None = None) -> Any:
    """The ASGI app over a started :class:`Engine`, wrapped in the :class:`Guard`."""
    pool = ThreadPoolExecutor(max_workers=engine.limits.chat_workers, thread_name_prefix="lmedit-chat")

    @contextlib.asynccontextmanager
    async def lifespan(_: Any):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lmedit serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    in_flight = {"n": 0}

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, e: ServeError) -> JSONResponse:
        return _error(e.status, str(e), e.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors()]
        return _error(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, f"{e.detail}: see the routes in GET / or the docs (docs/serve.md)"
                      if e.status_code in (404, 405) else str(e.detail))

    for exc in (EditInputError, ConfigError, UnknownMethodError, EditError, ValueError):
        app.add_exception_handler(exc, lambda _r, e: _error(400, str(e)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error ({type(e).__name__}: {e}); the server log has the details", "server_error")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id(engine):
            raise NotFound(f"model {name!r} is not served here; this server serves {model_id(engine)!r}")

    async def answer(prompt: str, body: Sampling, max_tokens: int | None, on_text=None) -> Generation:
        in_flight["n"] += 1
        try:
            job = partial(engine.generate, prompt, max_tokens=max_tokens, temperature=body.temperature,
                          top_p=body.top_p, on_text=on_text)
            return await asyncio.get_running_loop().run_in_executor(pool, job)
        finally:
            in_flight["n"] -= 1

    def respond(prompt: str, body: Sampling, max_tokens: int | None, chat: bool) -> Any:
        engine.check_request(prompt, max_tokens)  # fail with a 400 before a stream starts
        if in_flight["n"] >= engine.limits.max_queued_chats:
            raise TooBusy(f"{in_flight['n']} answers are queued; try again shortly")
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created, name = int(time.time()), model_id(engine)
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            key = "delta" if delta else "message"
            msg = ({"content": text} if text is not None else {}) if delta else {"role": "assistant", "content": text}
            return {"index": 0, key: msg, "finish_reason": finish}

        if not body.stream:
            async def full() -> dict[str, Any]:
                g = await answer(prompt, body, max_tokens)
                return {"id": cid, "object": obj, "created": created, "model": name,
                        "choices": [choice(g.text, g.finish_reason, False)],
                        "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                                  "total_tokens": g.prompt_tokens + g.completion_tokens}}
            return full()

        async def events():
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            chunk_obj = obj + ".chunk" if chat else obj

            def event(c: dict[str, Any]) -> str:
                return "data: " + json.dumps({"id": cid, "object": chunk_obj, "created": created, "model": name,
                                              "choices": [c]}) + "\n\n"

            task = asyncio.ensure_future(answer(prompt, body, max_tokens, lambda t: loop.call_soon_threadsafe(
                queue.put_nowait, t)))
            task.add_done_callback(lambda _: queue.put_nowait(None))
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            while (text := await queue.get()) is not None:
                yield event(choice(text, None, True))
            try:
                g = task.result()
            except Exception as e:  # noqa: BLE001  (the stream has started: report in it)
                yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error"}}) + "\n\n"
                return
            yield event(choice(None if chat else "", g.finish_reason, True))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-store"})

    # --- page and status ------------------------------------------------------------------------------
    page = resources.files("lmedit.serve").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return {**engine.status(), "model": model_id(engine)}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id(engine), "object": "model", "created": 0,
                                            "owned_by": "lmedit", "fingerprint": engine.handle.fingerprint}]}

    @app.get("/v1/methods")
    def methods() -> dict[str, Any]:
        from ..registry import editor_class, list_editors

        out = []
        for name in list_editors():
            cls = editor_class(name)
            if cls.capabilities.needs_fit:
                continue
            fields = [{"name": n, "type": re.sub(r"<class '([\w.]+)'>", r"\1", t),
                       "default": json.loads(json.dumps(d, default=str)), "help": h}
                      for n, t, d, h in cls.Config.describe_fields()]
            out.append({"name": name, "edit_kind": cls.capabilities.edit_kind.kind, "config": fields})
        return {"object": "list", "default": engine.method, "data": out}

    # --- OpenAI-compatible --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> Any:
        check_model(body.model)
        prompt = engine.render_chat([m.model_dump() for m in body.messages])
        res = respond(prompt, body, body.max_completion_tokens or body.max_tokens, chat=True)
        return await res if asyncio.iscoroutine(res) else res

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        check_model(body.model)
        res = respond(body.prompt, body, body.max_tokens if body.max_tokens is not None else 16, chat=False)
        return await res if asyncio.iscoroutine(res) else res

    # --- edits ---------------------------------------------------------------------------------------------
    def edit_id(value: str) -> str:
        if not ID.match(value):
            raise NotFound(f"no edit {value!r}: edit ids are 12 hex digits (GET /v1/edits lists them)")
        return value

    @app.post("/v1/edits")
    def add_edit(body: EditBody) -> dict[str, Any]:
        req = EditRequest(body.prompt, body.subject, body.target_new, target_true=body.target_true or None)
        spec = TeachSpec(req, body.method or engine.method, body.config, body.paraphrase or None,
                         body.neighbour or None, body.neighbour_answer or None, body.max_new_tokens)
        return {**engine.teach(spec).public(), "weights": engine.state}

    @app.get("/v1/edits")
    def list_edits(status: Literal["applied", "undone"] | None = None) -> dict[str, Any]:
        return {"object": "list", "weights": engine.state,
                "data": [r.public() for r in engine.store.records(status)]}

    @app.delete("/v1/edits")
    def undo_all() -> dict[str, Any]:
        return {"undone": engine.undo_all(), "weights": engine.state}

    @app.post("/v1/edits/import")
    async def import_edit(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadRequest(f"the body is not JSON: {e}") from e
        rec = await asyncio.get_running_loop().run_in_executor(None, engine.import_edit, doc)
        return {**rec.public(), "weights": engine.state}

    @app.get("/v1/edits/{eid}")
    def get_edit(eid: str) -> dict[str, Any]:
        rec = engine.store.get(edit_id(eid))
        if rec is None:
            raise NotFound(f"no edit {eid!r}; GET /v1/edits lists them")
        return rec.public()

    @app.delete("/v1/edits/{eid}")
    def delete_edit(eid: str) -> dict[str, Any]:
        return {**engine.undo(edit_id(eid)).public(), "weights": engine.state}

    @app.get("/v1/edits/{eid}/export")
    def export_edit(eid: str) -> JSONResponse:
        doc = engine.export(edit_id(eid))
        return JSONResponse(doc, headers={"content-disposition": f'attachment; filename="edit-{eid}.json"'})

    @app.post("/v1/trace")
    def trace(body: TraceBody) -> dict[str, Any]:
        return engine.trace(body.prompt, body.subject, body.kind, body.samples, body.noise)

    limits = engine.limits
    return Guard(app, api_key=api_key, allowed_hosts=allowed_hosts, max_body=limits.max_body_bytes,
                 max_import=limits.max_import_bytes)


def check_bind(host: str, api_key: str | None) -> set[str] | None:
    """Refuse a non-loopback address without an API key; returns the Host names the Guard accepts."""
    if is_loopback(host):
        return set(LOOPBACK_HOSTS) | {host}
    if not api_key:
        raise ValueError(f"--host {host} makes the server reachable from other machines: give --api-key KEY "
                         "(every request must then carry it), or keep the default --host 127.0.0.1")
    return None
