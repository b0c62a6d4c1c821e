"""Content digests of plain data (cases, cache keys) and of tensors: one canonical form, one hash.

Used wherever a run or cache entry must recognise "the same data" (benchmark resume and case adoption, the
table's cell keys), so that all of them agree on what "the same" means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def plain(obj: Any) -> Any:
    """Dataclasses, dicts, lists and tuples as nested plain dicts and lists (dict keys as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces; other types through ``str``)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def case_digest(case: Any) -> str:
    """Short identity of one case by content (prompt, targets, paraphrases, locality, ...)."""
    return digest(plain(case))[:12]


def request_digest(request: Any) -> str:
    """Identity of an edit request by what an editor sees: prompt (subject filled in), subject, new and
    true target; not its case_id, so the same fact in two datasets has one identity."""
    return digest([request.text, request.subject, request.target_new, request.target_true])[:16]


def tensor_digest(t: Any) -> str:
    """A full-content hash of one tensor (used for the parameters an edit touches)."""
    import torch

    data = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(str((tuple(data.shape), str(data.dtype))).encode())
    h.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:24]
