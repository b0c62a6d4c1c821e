"""Teaching one fact: the case to score, the edit's effect before/after, and the export/import format.

Everything here runs under the engine's exclusive lock; it never touches the store.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..edits import META_FILE, TENSOR_FILE, Edit, EditError
from ..types import QA, EditCase, EditInputError, EditRequest
from .errors import BadRequest

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

EXPORT_FORMAT = "lmedit.edit/1"
# Edit kinds accepted from the network. Edit.load builds a ModuleSwap's modules only from the registered swap
# module kinds (lmedit.swaps) and checks every tensor's digest, so no kind can run code from the file.
IMPORT_KINDS = ("weight_delta", "prompt_context", "module_swap")
# config fields that name files: a request may not set them (no path from a request reaches the disk)
PATH_FIELDS = ("checkpoint", "corpus", "cache_dir", "value_cache")


@dataclass
class TeachSpec:
    """What the page or ``POST /v1/edits`` asks for."""

    request: EditRequest
    method: str
    config: dict[str, Any]
    paraphrase: str | None = None
    neighbour: str | None = None
    neighbour_answer: str | None = None
    max_new_tokens: int = 12


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Refuse config values that could name a file on the server."""
    for key, value in config.items():
        if key in PATH_FIELDS:
            raise BadRequest(f"config field {key!r} names a file on the server and cannot be set through the "
                             "API; start the server with the file configured instead")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str) and ("/" in v or "\\" in v or v.startswith(".")):
                raise BadRequest(f"config field {key!r} = {v!r} looks like a path; give a name or a number")
    return config


def build_case(handle: ModelHandle, spec: TeachSpec, generate: Callable[[str], str]) -> EditCase:
    """The case scored for the edit: its prompt, the optional paraphrase and neighbour.

    A neighbour without an answer is scored against the current model's own continuation (locality only
    compares predictions, so any answer the model gives now will do).
    """
    locality = ()
    neighborhood = ()
    if spec.neighbour:
        answer = spec.neighbour_answer or generate(spec.neighbour).strip().split("\n")[0][:60].strip()
        locality = (QA(spec.neighbour, answer or "the"),)
        neighborhood = (spec.neighbour,) if spec.request.target_true else ()
    return EditCase(spec.request, paraphrases=(spec.paraphrase,) if spec.paraphrase else (),
                    locality=locality, neighborhood=neighborhood, source="lmedit serve")


def _prompts(case: EditCase) -> list[tuple[str, str]]:
    out = [("prompt", case.request.text)]
    out += [("paraphrase", p) for p in case.paraphrases]
    out += [("neighbour", q.prompt) for q in case.locality]
    return out


def apply_and_measure(handle: ModelHandle, case: EditCase, make_edit: Callable[[], Edit],
                      generate: Callable[[str], str]) -> tuple[Edit, dict[str, Any], Any]:
    """Continuations before, the edit made (``make_edit``) under the efficiency meter and applied, then the
    continuations after and the scores. Returns (applied edit, report, measurement); on any error after
    the edit was applied it is reverted, so the model is as it was."""
    from ..metrics.efficiency import measure
    from ..metrics.evaluate import baseline, evaluate

    continuations = [{"label": k, "prompt": p, "before": generate(p)} for k, p in _prompts(case)]
    # the baseline is the model as served now; it cannot be taken with in-context edits active
    base = None if handle.contexts else baseline(handle, [case])
    with measure() as meter:
        edit = make_edit()
    edit.apply(handle)
    try:
        for c in continuations:
            c["after"] = generate(c["prompt"])
        scores: dict[str, Any] = {}
        note = None
        if base is None:
            note = "no scores: in-context edits are in force, and scores need a baseline without them"
        else:
            (result,) = evaluate(handle, [case], None, base=base)
            for name, s in result.post.items():
                pre = result.pre.get(name)
                scores[name] = {"pre": None if pre is None or name == "locality" else pre.value,
                                "post": s.value, "protocol": s.protocol}
    except BaseException:
        edit.revert(handle)
        raise
    report = {"case": {"paraphrase": list(case.paraphrases), "neighbour": [q.prompt for q in case.locality]},
              "continuations": continuations, "scores": scores, "note": note,
              "efficiency": {"seconds": meter.seconds, "peak_rss_bytes": meter.peak_rss_bytes,
                             "cuda_peak_bytes": meter.cuda_peak_bytes}}
    return edit, report, meter


# --- export / import ------------------------------------------------------------------------------
def export_document(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """One JSON document: the saved edit's JSON, its safetensors file in base64, and the log record."""
    tensors = folder / TENSOR_FILE
    return {"format": EXPORT_FORMAT, "edit": json.loads((folder / META_FILE).read_text()),
            "tensors": base64.b64encode(tensors.read_bytes()).decode() if tensors.exists() else None,
            "record": record}


def load_document(doc: Any, model_fingerprint: str) -> Edit:
    """The Edit in an exported document, checked: known format, an allowed kind, made for this model.

    The files are written under names chosen here into a temporary folder and read back with
    :meth:`Edit.load` (JSON and safetensors only)."""
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise BadRequest(f"not an exported edit: the body must be the JSON that GET /v1/edits/{{id}}/export "
                         f"returns (format {EXPORT_FORMAT!r})")
    body = doc.get("edit")
    if not isinstance(body, dict) or not isinstance(body.get("meta"), dict):
        raise BadRequest("the exported edit has no 'edit' object with a 'meta' object")
    if body.get("kind") not in IMPORT_KINDS:
        raise BadRequest(f"edits of kind {body.get('kind')!r} cannot be imported; importable kinds: "
                         f"{', '.join(IMPORT_KINDS)}")
    want = body["meta"].get("model_fingerprint")
    if want != model_fingerprint:
        raise BadRequest(f"this edit was made for model fingerprint {want!r}, and this server's model is "
                         f"{model_fingerprint!r}; import it into a server running the model it was made for")
    blob = doc.get("tensors")
    if blob is not None and not isinstance(blob, str):
        raise BadRequest("'tensors' must be base64 text (the safetensors file) or null")
    with tempfile.TemporaryDirectory(prefix="lmedit-import-") as tmp:
        folder = Path(tmp)
        (folder / META_FILE).write_text(json.dumps(body))
        if blob is not None:
            try:
                (folder / TENSOR_FILE).write_bytes(base64.b64decode(blob, validate=True))
            except (binascii.Error, ValueError) as e:
                raise BadRequest(f"'tensors' is not valid base64: {e}") from e
        try:
            edit = Edit.load(folder)
        except (EditError, EditInputError, KeyError, TypeError, ValueError) as e:
            raise BadRequest(f"the exported edit cannot be read: {e}") from e
    if not edit.meta.get("requests"):
        raise BadRequest("the exported edit lists no requests in meta.requests; export it again from lmedit")
    return edit


def case_of(edit: Edit) -> EditCase:
    """The case of an imported edit: its first request, nothing else to score."""
    try:
        req = EditRequest.from_dict(edit.meta["requests"][0])
    except (EditInputError, TypeError, KeyError) as e:
        raise BadRequest(f"the exported edit's first request is not valid: {e}") from e
    return EditCase(req, source="import")
