"""The engine owns the model handle: it answers prompts, applies and undoes edits, and keeps the log.

Chats hold the shared side of a read/write lock for a whole answer; edits, undos, imports and causal traces
(which install hooks on the model) hold the exclusive side, so they run one at a time and no answer ever
reads half-applied weights.

Undoing an edit that is not the newest: the edits above it are reverted from the top down to it (every
revert is exact), then each later edit is rebuilt on the restored weights, oldest first:

- re-applied as saved when it does not depend on the weights it was computed on, or provably still sees
  the same ones: an in-context edit, or a weight delta whose base digests (every parameter it changes)
  still match;
- otherwise recomputed from its logged request, method and resolved config, and saved again.

The rebuilt state is the one a fresh replay of the remaining log gives; if a later edit cannot be rebuilt
(its method needs a trained checkpoint), the undo is refused and the model is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..edits import Edit, EditError, EditMismatchError, PromptContext, WeightDelta
from ..metrics.efficiency import release_freed_memory
from ..types import EditInputError, EditRequest
from . import teach
from .errors import BadRequest, Conflict, NotFound, TooBusy, Unavailable
from .locks import RWLock
from .store import APPLIED, EditRecord, EditStore, StoreError, new_id

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for."""

    max_tokens: int = 512  # tokens generated per answer
    default_max_tokens: int = 128
    max_body_bytes: int = 64 * 1024  # every JSON body but imports
    max_import_bytes: int = 64 * 1024 * 1024
    max_pending_edits: int = 8  # edits waiting for the lock; more get 429
    chat_workers: int = 4  # answers generated at once; more wait in a queue
    max_queued_chats: int = 64
    max_trace_tokens: int = 48
    max_trace_samples: int = 10


@dataclass
class Generation:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    ids: list[int] = field(default_factory=list)


def state_fingerprint(handle: ModelHandle) -> str:
    """Identity of everything that decides an answer: every parameter's full content and the in-context
    prefixes (``ModelHandle.state_digest`` covers modules installed by swaps, since they are parameters)."""
    blob = handle.state_digest() + json.dumps(handle.contexts)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _TextStream:
    """A transformers streamer that hands out text as it is decoded (held back mid UTF-8 character)."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None, out: Generation) -> None:
        self.tokenizer, self.on_text, self.out = tokenizer, on_text, out
        self._prompt = True

    def put(self, value: Any) -> None:
        if self._prompt:  # the first call carries the prompt (decoder start token for encoder-decoders)
            self._prompt = False
            return
        self.out.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.out.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        new, self.out.text = text[len(self.out.text):], text
        if new and self.on_text:
            self.on_text(new)


class Engine:
    """One model, one store, and the lock between them. Call :meth:`start` before anything else."""

    def __init__(self, handle: ModelHandle, store: EditStore, *, method: str = "rome",
                 limits: Limits | None = None) -> None:
        self.handle, self.store, self.method = handle, store, method
        self.limits = limits or Limits()
        self.lock = RWLock()
        self.busy: str | None = None  # what holds the exclusive lock now
        self.state = ""
        self.base_state = ""
        self._stack: list[tuple[EditRecord, Edit]] = []
        self._pending = 0
        self._pending_lock = threading.Lock()

    # --- start-up: replay the log ------------------------------------------------------------------
    def start(self) -> Engine:
        """Open the store, re-apply its edits in order and check the resulting weights' fingerprint."""
        self.base_state = state_fingerprint(self.handle)
        self.store.open(self.handle.name, self.handle.fingerprint, self.base_state)
        try:
            for rec in self.store.records(APPLIED):
                edit = Edit.load(self.store.path_of(rec))
                edit.apply(self.handle)
                self._stack.append((rec, edit))
            self.state = state_fingerprint(self.handle)
            want = self._stack[-1][0].state_after if self._stack else self.base_state
            if self.state != want:
                raise StoreError(f"re-applying the {len(self._stack)} edit(s) logged in {self.store.folder} gives "
                                 f"weights {self.state}, but the log recorded {want}; the log or its files were "
                                 "changed outside lmedit serve: move the folder away to start from the base model")
        except BaseException:
            for _, edit in reversed(self._stack):
                edit.revert(self.handle)
            self._stack.clear()
            self.store.close()
            raise
        log.info("serving %s with %d edit(s); weights %s", self.handle.name, len(self._stack), self.state)
        return self

    def close(self) -> None:
        self.store.close()

    # --- reading -------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"model": self.handle.name, "model_fingerprint": self.handle.fingerprint,
                "weights": self.state, "base_weights": self.base_state, "edits": len(self._stack),
                "busy": self.busy, "chats_running": self.lock.readers, "default_method": self.method,
                "max_tokens": self.limits.max_tokens}

    def applied(self) -> list[EditRecord]:
        return [rec for rec, _ in self._stack]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat as one prompt: the tokenizer's chat template, or (base models have none) the messages'
        texts one per line, which the model continues."""
        tok = self.handle.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n".join(m["content"] for m in messages)

    def check_request(self, prompt: str, max_tokens: int | None) -> int:
        """The number of prompt tokens, once ``max_tokens`` and the prompt are known to fit the bounds."""
        n = self.limits.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= n <= self.limits.max_tokens:
            raise BadRequest(f"max_tokens must be between 1 and {self.limits.max_tokens}, got {n}")
        used = len(self.handle.tokens.prompt_ids(self.handle.render(prompt)))
        window = getattr(self.handle.model.config, "max_position_embeddings", None)
        if window and used + n > window:
            raise BadRequest(f"the prompt has {used} tokens; with max_tokens={n} that passes the model's "
                             f"{window}-token window: shorten the prompt or lower max_tokens")
        return used

    def generate(self, prompt: str, *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        """One answer under the shared lock (greedy unless ``temperature`` > 0)."""
        n = self.limits.default_max_tokens if max_tokens is None else max_tokens
        sampling: dict[str, Any] = {}
        if temperature:
            sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p or 1.0)}
        out = Generation()
        with self.lock.shared():
            out.prompt_tokens = self.check_request(prompt, n)  # again: in-context edits may have changed it
            self.handle.generate(prompt, n, streamer=_TextStream(self.handle.tokenizer, on_text, out), **sampling)
        out.completion_tokens = len(out.ids)
        eos = self.handle.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        out.finish_reason = "stop" if out.ids and out.ids[-1] in eos else "length"
        return out

    def _continue(self, prompt: str, max_new_tokens: int) -> str:
        """A greedy continuation inside an exclusive section (the lock is already held)."""
        return self.handle.generate(prompt, max_new_tokens)

    # --- writing -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        with self._pending_lock:
            if self._pending >= self.limits.max_pending_edits:
                raise TooBusy(f"{self._pending} edits are already waiting; try again when they are done")
            self._pending += 1
        try:
            with self.lock.exclusive():
                self.busy = what
                try:
                    yield
                finally:
                    self.busy = None
        finally:
            with self._pending_lock:
                self._pending -= 1

    def teach(self, spec: teach.TeachSpec) -> EditRecord:
        """Compute an edit for ``spec``, apply it, score it and log it (one transaction)."""
        from ..registry import editor_class, get_editor

        cls = editor_class(spec.method)
        if cls.capabilities.needs_fit:
            raise BadRequest(f"method {spec.method!r} needs a trained checkpoint, which the API cannot name; "
                             "pick a method that edits without training (GET /v1/methods)")
        editor = get_editor(spec.method, teach.check_config(spec.config))
        with self._exclusive(f"teaching {spec.request.text!r} -> {spec.request.target_new!r}"):
            gen = lambda p: self._continue(p, spec.max_new_tokens)  # noqa: E731
            case = teach.build_case(self.handle, spec, gen)
            edit, report, meter = teach.apply_and_measure(self.handle, case, lambda: editor.compute(
                self.handle, spec.request), gen)
            return self._commit(edit, report, "api", meter.peak_rss_bytes)

    def import_edit(self, doc: Any) -> EditRecord:
        """Apply an exported edit (checked by :func:`teach.load_document`) and log it."""
        edit = teach.load_document(doc, self.handle.fingerprint)
        case = teach.case_of(edit)
        with self._exclusive("importing an edit"):
            gen = lambda p: self._continue(p, 12)  # noqa: E731
            try:
                edit, report, meter = teach.apply_and_measure(self.handle, case, lambda: edit, gen)
            except EditMismatchError as e:
                raise BadRequest(f"the imported edit does not fit the weights served now: {e}") from e
            return self._commit(edit, report, "import", meter.peak_rss_bytes)

    def _commit(self, edit: Edit, report: dict[str, Any], source: str, peak_rss: int | None) -> EditRecord:
        """Log an applied edit: files first, then the row; on failure the edit is reverted."""
        edit_id = new_id()
        meta = edit.meta
        rec = EditRecord(
            id=edit_id, status=APPLIED, source=source, method=str(meta.get("method", "?")), kind=edit.kind,
            requests=list(meta.get("requests", [])), config=dict(meta.get("config", {})),
            config_hash=str(meta.get("config_hash", "")), folder=edit_id, state_before=self.state,
            state_after="", created=time.time(), compute_seconds=meta.get("compute_seconds"),
            peak_rss_bytes=peak_rss, report=report)
        try:
            rec.state_after = state_fingerprint(self.handle)
            self.store.write_edit(edit, rec.folder)
            self.store.add(rec)
        except BaseException:
            edit.revert(self.handle)
            self.store.discard(rec.folder)
            raise
        self._stack.append((rec, edit))
        self.state = rec.state_after
        log.info("edit %s applied (%s); weights %s", rec.id, rec.method, self.state)
        release_freed_memory()  # a server lives through many edits: give back what each one freed
        return rec

    def undo(self, edit_id: str) -> EditRecord:
        """Undo one edit (see the module docstring for edits that are not the newest)."""
        with self._exclusive(f"undoing {edit_id}"):
            idx = next((i for i, (rec, _) in enumerate(self._stack) if rec.id == edit_id), None)
            if idx is None:
                known = self.store.get(edit_id)
                if known is None:
                    raise NotFound(f"no edit {edit_id!r}; GET /v1/edits lists them")
                raise Conflict(f"edit {edit_id!r} is already {known.status}")
            self._check_handle_stack()
            self._undo_from(idx, [edit_id])
            rec = self.store.get(edit_id)
            assert rec is not None
            return rec

    def undo_all(self) -> list[str]:
        with self._exclusive("undoing every edit"):
            ids = [rec.id for rec, _ in self._stack]
            if ids:
                self._check_handle_stack()
                self._undo_from(0, ids)
            return ids

    def _check_handle_stack(self) -> None:
        # ModelHandle.applied_edits (hardening issue): nothing else may have stacked edits on this handle
        stacked = getattr(self.handle, "applied_edits", None)
        if stacked is not None and list(stacked) != [e for _, e in self._stack]:
            raise Conflict("the model holds edits the server did not apply; restart the server")

    def _undo_from(self, idx: int, undone: list[str]) -> None:
        """Revert the stack down to ``idx``, rebuild the edits above it that are not in ``undone``, log."""
        top = self._stack[idx:]
        for _, edit in reversed(top):
            edit.revert(self.handle)
        kept, rebuilt, state = list(self._stack[:idx]), [], top[0][0].state_before
        new_folders: list[str] = []
        try:
            for rec, edit in top:
                if rec.id in undone:
                    continue
                edit2, how = self._rebuild(rec, edit)
                kept.append((rec, edit2))  # applied now: the rollback below must see it
                rec2 = replace(rec, state_before=state, state_after=state_fingerprint(self.handle),
                               report={**rec.report, "rebuilt": how})
                if edit2 is not edit:
                    rec2.folder = f"{rec.id}-{new_id()[:6]}"
                    rec2.config, rec2.config_hash = edit2.meta.get("config", {}), edit2.meta.get("config_hash", "")
                    self.store.write_edit(edit2, rec2.folder)
                    new_folders.append(rec2.folder)
                kept[-1] = (rec2, edit2)
                rebuilt.append(rec2)
                state = rec2.state_after
            self.store.mark_undone(undone, rebuilt)
        except BaseException:
            for _, edit in reversed(kept[idx:]):
                edit.revert(self.handle)
            for _, edit in top:
                edit.apply(self.handle)
            for f in new_folders:
                self.store.discard(f)
            raise
        for rec in rebuilt:  # folders replaced by a recomputed edit
            old = next(r for r, _ in top if r.id == rec.id)
            if old.folder != rec.folder:
                self.store.discard(old.folder)
        self._stack, self.state = kept, state
        log.info("undid %s; %d edit(s) rebuilt; weights %s", ", ".join(undone), len(rebuilt), state)

    def _rebuild(self, rec: EditRecord, edit: Edit) -> tuple[Edit, str]:
        """Re-apply ``edit`` if it cannot depend on what changed below it, else recompute it."""
        digests = getattr(edit, "base_digests", {})
        if isinstance(edit, PromptContext) or (isinstance(edit, WeightDelta) and set(edit.deltas) <= set(digests)):
            try:
                edit.apply(self.handle)  # strict: refuses when the parameters it was computed on changed
                return edit, "reapplied"
            except EditMismatchError:
                pass
        from ..registry import editor_class, get_editor

        try:
            if editor_class(rec.method).capabilities.needs_fit:
                raise Conflict(f"edit {rec.id} (method {rec.method}) sits above the undone edit and must be "
                               "recomputed, which its method cannot do without a trained checkpoint; undo it first")
            requests = [EditRequest.from_dict(r) for r in rec.requests]
            fresh = get_editor(rec.method, rec.config).compute(self.handle, requests)
        except (KeyError, EditInputError, EditError, ValueError) as e:
            raise Conflict(f"edit {rec.id} above the undone one cannot be recomputed ({e}); undo it first") from e
        fresh.apply(self.handle)
        return fresh, "recomputed"

    # --- reading the saved edits and tracing ---------------------------------------------------------------
    def export(self, edit_id: str) -> dict[str, Any]:
        rec = self.store.get(edit_id)
        if rec is None:
            raise NotFound(f"no edit {edit_id!r}; GET /v1/edits lists them")
        return teach.export_document(self.store.path_of(rec), rec.public())

    def trace(self, prompt: str, subject: str, kind: str, samples: int, noise: float | None = None) -> dict[str, Any]:
        """A causal trace of one fact on the weights served now (exclusive: it hooks the model). ``noise``:
        the corruption scale; None is ROME's 3σ of the known facts' subject embeddings."""
        from ..tracing import KINDS, trace_fact

        if kind not in KINDS:
            raise BadRequest(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not 1 <= samples <= self.limits.max_trace_samples:
            raise BadRequest(f"samples must be between 1 and {self.limits.max_trace_samples}")
        n = len(self.handle.tokens.prompt_ids(prompt))
        if n > self.limits.max_trace_tokens:
            raise BadRequest(f"the prompt has {n} tokens; traces take at most {self.limits.max_trace_tokens}")
        with self._exclusive(f"tracing {prompt!r}"):
            try:
                res = trace_fact(self.handle, prompt, subject, kind=kind, samples=samples, noise=noise)
            except (EditInputError, ValueError) as e:
                raise BadRequest(str(e)) from e
            except FileNotFoundError as e:
                raise Unavailable(f"{e}\n(or pass noise, a number, to trace without that file)") from e
        return {"tokens": res.tokens, "subject_range": list(res.subject_range), "answer": res.answer,
                "kind": res.kind, "low_score": res.low_score, "high_score": res.high_score,
                "scores": [[None if v != v else float(v) for v in row] for row in res.scores]}
