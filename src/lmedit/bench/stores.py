"""Results kept on disk so that a later run takes them instead of computing them again.

:class:`EditStore` -- edits. An editor whose ``compute`` depends only on the model's weights, its resolved
config and the request (``Editor.pure_compute``; a trained editor also on its checkpoint) computes the same
edit whenever it sees the same request from the same weights. Table 1 edits many facts twice: 35 of the
first 100 ZsRE-portability requests are ZsRE requests too. A store shares those edits between cells (and
between worker processes, which share the disk). Layout: ``<root>/<scope>/<request digest>/`` holds one
saved :class:`~lmedit.edits.Edit` plus ``efficiency.json`` (what computing it cost). The scope is the digest
of the method, its config hash, the checkpoint's content, the model fingerprint and lmedit's version, so a
changed config or a retrained editor never meets an old edit; a stored edit is applied strictly, so
weights other than the ones it was computed on refuse it.

:class:`BaselineStore` -- the unedited model's scores of a case (pre-edit metrics, the locality
predictions that post-edit locality compares against and, for the generation protocol, the generated
answers). Every method of a table scores the same unedited
model on the same cases; the store scores each case once. Layout: ``<root>/<scope>/<case digest>.json``;
the scope is the digest of every weight of the model (``ModelHandle.state_digest``), its dtype and
device, the scoring protocols and lmedit's version.

Entries are written atomically (a rename); a corrupted one is recomputed, not trusted.

:class:`RunBaselines` -- the same scores, kept inside one run folder (``baseline.jsonl``, a line per case,
appended as each slice of cases is scored): a run resumed after a crash takes them instead of scoring the
unedited model again (about 15 minutes for 1,000 ZsRE cases under both protocols on SmolLM2 here). Same
scope as :class:`BaselineStore`, so other weights, protocols or another lmedit version score again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..digests import case_digest, digest, request_digest
from ..edits import Edit
from ..io import append_jsonl, cache_file, read_jsonl
from ..metrics.records import Score
from ..metrics.scoring import TargetScore

if TYPE_CHECKING:
    from ..models.handle import ModelHandle
    from .run import _Run

log = logging.getLogger(__name__)

EFFICIENCY_FILE = "efficiency.json"
BASELINE_FILE = "baseline.jsonl"
BASELINE_SLICE = 32  # cases whose baseline is scored (and kept) at a time


def edit_scope(editor: Any, header: dict[str, Any]) -> str | None:
    """Where ``editor``'s edits live in a store, from a run header (method, config hash, model, checkpoint);
    None when its edits cannot be reused: its compute keeps state between calls, or it is trained but its
    state is not a checkpoint on disk."""
    from .. import __version__

    if not getattr(editor, "pure_compute", True):
        return None
    if editor.capabilities.needs_fit and not header.get("checkpoint_state"):
        return None
    return digest([header["method"], header["config_hash"], header["model"]["fingerprint"],
                   header.get("checkpoint_state"), __version__])[:16]


def edit_bytes(edit: Edit) -> int:
    """Bytes of the tensors a saved ``edit`` holds."""
    tensors, _ = edit._to_state()
    return sum(t.numel() * t.element_size() for t in tensors.values())


class EditStore:
    """Single-request edits on disk under ``root``.

    Args:
        requests: digests (:func:`~lmedit.digests.request_digest`) of the requests worth keeping, e.g. those
            that more than one table cell edits; None keeps every edit.
        max_bytes: an edit larger than this is not kept (a dense fine-tuning delta of a large model would
            cost more disk and reading time than recomputing it saves).
    """

    def __init__(self, root: str | Path, *, requests: Iterable[str] | None = None,
                 max_bytes: int = 64 * 2**20) -> None:
        self.root = Path(root)
        self.wanted = set(requests) if requests is not None else None
        self.max_bytes = max_bytes

    def _path(self, scope: str, request: Any) -> Path:
        return self.root / scope / request_digest(request)

    def get(self, scope: str, request: Any) -> tuple[Edit, dict[str, Any]] | None:
        """The stored edit of ``request`` and what computing it cost, or None (absent or unreadable)."""
        path = self._path(scope, request)
        if not path.is_dir():
            return None
        try:
            edit = Edit.load(path)
            efficiency = json.loads((path / EFFICIENCY_FILE).read_text())
        except Exception as e:  # noqa: BLE001  (corrupt entries of any sort are recomputed)
            log.warning("ignoring the stored edit at %s (%s); computing it again", path, e)
            shutil.rmtree(path, ignore_errors=True)
            return None
        return edit, efficiency

    def put(self, scope: str, request: Any, edit: Edit, efficiency: dict[str, Any]) -> bool:
        """Keep ``edit`` when its request is wanted and it is small enough; True when it was written."""
        if self.wanted is not None and request_digest(request) not in self.wanted:
            return False
        if edit_bytes(edit) > self.max_bytes:
            return False
        path = self._path(scope, request)
        if path.exists():
            return False
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            edit.save(tmp)
            (tmp / EFFICIENCY_FILE).write_text(json.dumps(efficiency))
            os.rename(tmp, path)  # atomic; fails when another process stored the same edit meanwhile
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not path.exists():
                log.warning("could not store the edit of %r: %s", request.text, e)
            return False
        return True


class BaselineStore:
    """The unedited model's scores per case under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def scope(handle: ModelHandle, state_digest: str, protocols: Sequence[str]) -> str:
        """Where the scores of ``handle``'s model with these weights (``state_digest``) live."""
        from .. import __version__

        return digest([state_digest, str(handle.dtype), handle.device.type, sorted(protocols), __version__])[:16]

    def _path(self, scope: str, case: Any) -> Path:
        return self.root / scope / f"{case_digest(case)}.json"

    def get(self, scope: str, case: Any) -> tuple[dict[str, Score], list[TargetScore], list[dict]] | None:
        """(pre-edit scores, locality predictions, generated text records) of ``case``, or None (absent or
        unreadable)."""
        path = self._path(scope, case)
        if not path.exists():
            return None
        try:
            return _from_doc(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the stored baseline at %s (%s); scoring it again", path, e)
            path.unlink(missing_ok=True)
            return None

    def put(self, scope: str, case: Any, pre: dict[str, Score], loc: list[TargetScore],
            texts: list[dict] | None = None) -> None:
        """Store ``case``'s pre-edit scores, locality predictions and generated texts for :meth:`get`
        (written atomically)."""
        doc = _to_doc(pre, loc, texts)
        cache_file(self._path(scope, case), lambda tmp: tmp.write_text(json.dumps(doc)), "the baseline of a case")


class RunBaselines:
    """The unedited model's scores of a run's cases in ``<run folder>/baseline.jsonl`` (module docstring);
    the same ``scope`` / ``get`` / ``put`` as :class:`BaselineStore`."""

    scope = staticmethod(BaselineStore.scope)

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / BASELINE_FILE
        self.docs = {(r.get("scope"), r.get("case")): r for r in read_jsonl(self.path)}

    def get(self, scope: str, case: Any) -> tuple[dict[str, Score], list[TargetScore], list[dict]] | None:
        """(pre-edit scores, locality predictions, generated text records) of ``case``, or None (absent or
        unreadable: that case is scored again)."""
        doc = self.docs.get((scope, case_digest(case)))
        if doc is None:
            return None
        try:
            return _from_doc(doc)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring a baseline line of %s (%s); scoring that case again", self.path, e)
            return None

    def put(self, scope: str, case: Any, pre: dict[str, Score], loc: list[TargetScore],
            texts: list[dict] | None = None) -> None:
        """Append ``case``'s pre-edit scores, locality predictions and generated texts (one flushed line)."""
        doc = {"scope": scope, "case": case_digest(case), **_to_doc(pre, loc, texts)}
        append_jsonl(self.path, [doc])
        self.docs[(scope, doc["case"])] = doc


def _to_doc(pre: dict[str, Score], loc: list[TargetScore], texts: list[dict] | None) -> dict[str, Any]:
    return {"pre": {k: dataclasses.asdict(v) for k, v in pre.items()},
            "locality": [dataclasses.asdict(t) for t in loc], "texts": list(texts or [])}


def _from_doc(doc: dict[str, Any]) -> tuple[dict[str, Score], list[TargetScore], list[dict]]:
    pre = {k: Score(**v) for k, v in doc["pre"].items()}
    loc = [TargetScore(tuple(t["pred"]), tuple(t["labels"]), tuple(t["logprobs"])) for t in doc["locality"]]
    return pre, loc, list(doc.get("texts", []))


def score_baseline(run: _Run, pending: list[int], state_digest: str, store: Any) -> None:
    """The unedited model's scores of the pending cases of a run (``run.base``): from ``store`` (a
    :class:`BaselineStore`, :class:`RunBaselines` or None) where it has them, else computed and kept there,
    :data:`BASELINE_SLICE` cases at a time (without a store, in one batched pass)."""
    got: dict[int, tuple[dict, list, list]] = {}
    scope = store.scope(run.handle, state_digest, run.scorer.labels(run.protocols, run.generation)) \
        if store is not None else ""
    if store is not None:
        got = {i: hit for i in pending if (hit := store.get(scope, run.cases[i])) is not None}
    todo = [i for i in pending if i not in got]
    if todo:
        log.info("scoring the unedited model on %d case(s) (baseline)", len(todo))
    step = BASELINE_SLICE if store is not None else max(len(todo), 1)  # kept a slice at a time: a crash loses one
    for s in range(0, len(todo), step):
        part = todo[s:s + step]
        b = run.scorer.baseline(run.handle, [run.cases[i] for i in part], protocols=run.protocols,
                                generation=run.generation)
        for i, pre, loc, texts in zip(part, b.pre, b.locality, b.texts or [[] for _ in part], strict=True):
            got[i] = (pre, loc, texts)
            if store is not None:
                store.put(scope, run.cases[i], pre, loc, texts)
    run.base = {run.keys[i]: got[i] for i in pending}
