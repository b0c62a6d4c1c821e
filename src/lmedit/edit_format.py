"""The saved-edit file format: what :meth:`lmedit.edits.Edit.save` writes and what ``Edit.load`` checks
before it builds anything.

A saved edit is a folder::

    edit.json            {"format": 2, "kind", "meta", "body", "tensors": {name: {dtype, shape, sha256}},
                          "sha256": digest of the canonical JSON of everything else}
    tensors.safetensors  the tensors (absent when the edit has none)

Loading refuses -- with :class:`FormatProblem`, which ``Edit.load`` turns into ``EditFileError`` -- a file of
another format (older files carry no digests, so nothing in them can be verified: they must be recomputed),
a missing field, metadata whose digest does not match (any change to the JSON after saving), a tensor file
whose set of names, dtypes, shapes or sha256 digests differs from the manifest, and a missing
``meta["model_fingerprint"]`` (without it the model check would be off). The digests detect corruption and
accidental changes; they are not a signature. Safety does not rest on them: nothing in a saved edit is ever
imported or unpickled (tensors are safetensors; module classes come from the swap-module registry).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write

FORMAT = 2
META_FILE = "edit.json"
TENSOR_FILE = "tensors.safetensors"
REQUIRED = {"format": int, "kind": str, "meta": dict, "body": dict, "tensors": dict, "sha256": str}
RECOMPUTE = "recompute the edit (editor.compute, then edit.save) and save it again"


class FormatProblem(ValueError):
    """What is wrong with a saved edit; the caller adds the folder."""


def malformed(what: str) -> FormatProblem:
    """The error for a saved edit whose structure is wrong (``what`` says which part)."""
    return FormatProblem(f"is malformed: {what}; {RECOMPUTE}")


def canonical(obj: Any) -> bytes:
    """The canonical JSON of ``obj`` (sorted keys, no spaces): equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def plain_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (non-JSON values become strings), so digests survive a round trip."""
    return json.loads(json.dumps(obj, default=str))


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes."""
    data = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    if data.numel():
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _entry(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "sha256": tensor_sha256(t)}


def write(path: Path, kind: str, meta: dict[str, Any], body: dict[str, Any],
          tensors: dict[str, torch.Tensor]) -> Path:
    """Write a saved edit into folder ``path`` (tensors first, ``edit.json`` last, both atomically)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    doc = {"format": FORMAT, "kind": kind, "meta": plain_json(meta), "body": plain_json(body),
           "tensors": {k: _entry(v) for k, v in sorted(tensors.items())}}
    doc["sha256"] = hashlib.sha256(canonical(doc)).hexdigest()
    path.mkdir(parents=True, exist_ok=True)
    if tensors:
        atomic_write(path / TENSOR_FILE, save(tensors))
    else:
        (path / TENSOR_FILE).unlink(missing_ok=True)
    atomic_write(path / META_FILE, json.dumps(doc, indent=1, ensure_ascii=False))
    return path


def read(path: Path) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(kind, meta, body, tensors) of the saved edit in ``path``, after every check in the module docstring."""
    from safetensors.torch import load_file

    try:
        doc = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatProblem(f"is corrupted: {META_FILE} does not parse ({e}); {RECOMPUTE}") from None
    if not isinstance(doc, dict):
        raise FormatProblem(f"is corrupted: {META_FILE} is not a JSON object; {RECOMPUTE}")
    if "format" not in doc:
        raise FormatProblem(f"was saved by an older lmedit, without integrity digests, so it cannot be verified; "
                            f"{RECOMPUTE}")
    if doc["format"] != FORMAT:
        raise FormatProblem(f"has format {doc['format']!r}; this lmedit reads format {FORMAT}: {RECOMPUTE}")
    for field, typ in REQUIRED.items():
        if not isinstance(doc.get(field), typ):
            got = "missing" if field not in doc else f"a {type(doc[field]).__name__}"
            raise FormatProblem(f"is malformed: field {field!r} of {META_FILE} is {got}, not a {typ.__name__}; "
                                f"{RECOMPUTE}")
    want = doc.pop("sha256")
    if hashlib.sha256(canonical(doc)).hexdigest() != want:
        raise FormatProblem(f"was changed after it was saved: the digest of {META_FILE} does not match; {RECOMPUTE}")
    fp = doc["meta"].get("model_fingerprint")
    if not isinstance(fp, str) or not fp:
        raise FormatProblem(f"has no meta.model_fingerprint, so the model it was made for cannot be checked; "
                            f"{RECOMPUTE}")
    manifest = doc["tensors"]
    tfile = path / TENSOR_FILE
    if manifest and not tfile.exists():
        raise FormatProblem(f"lacks {TENSOR_FILE} ({len(manifest)} tensors listed in {META_FILE}); {RECOMPUTE}")
    try:
        tensors = load_file(tfile) if manifest else {}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for torn files)
        raise FormatProblem(f"is corrupted: {TENSOR_FILE} does not load ({e}); {RECOMPUTE}") from None
    if set(tensors) != set(manifest):
        extra, missing = sorted(set(tensors) - set(manifest)), sorted(set(manifest) - set(tensors))
        raise FormatProblem(f"has tensors that do not match its manifest (missing {missing}, unexpected {extra}); "
                            f"{RECOMPUTE}")
    for name, t in tensors.items():
        if not isinstance(manifest[name], dict) or manifest[name] != _entry(t):
            raise FormatProblem(f"has tensor {name!r} whose dtype, shape or content differs from what was saved "
                                f"(sha256 mismatch); {RECOMPUTE}")
    return doc["kind"], doc["meta"], doc["body"], tensors
