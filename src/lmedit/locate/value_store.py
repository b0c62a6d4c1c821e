"""A disk store of the target values (z, v*) that the locate-then-edit editors optimise before their
solve, which are almost all of an edit's time. They depend only on the weights, the edited layer and site,
the value settings, the context templates and the request, not on λ, the lower layers or the solver: MEMIT,
EMMET and AlphaEdit with the same value settings share them, and so do runs that sweep the solver's
settings (the original MEMIT code keeps a cache of z for the same reason). A batch run of many facts also
resumes from the values it had stored before it was stopped. Layout: ``<root>/<scope>/<request digest>.pt``;
the scope is the :func:`lmedit.io.cache_key` of every weight's digest, the dtype, the layer, the sites, the
value options, the templates and lmedit's version (values stored under the scope's older name, a bare
digest of the same, are found there and linked).

Entries are written atomically (a rename); a corrupted one is recomputed, not trusted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..digests import digest, request_digest
from ..io import cache_file, cache_key, cache_path

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


class ValueStore:
    """Optimised target values per request under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def scope(handle: ModelHandle, layer: int, sites: Sequence[str], options: Any,
              templates: Any) -> tuple[str, str]:
        """Where the values of ``handle``'s current weights at ``layer`` with these settings live: the folder
        name, and its name before :func:`lmedit.io.cache_key` named it (read as a fallback)."""
        from .. import __version__

        state = handle.state_digest()
        added = {"answer_end": "", "matmuls": "model"}  # options added later: their defaults keep old scopes
        opts = {k: v for k, v in dataclasses.asdict(options).items() if k not in added or v != added[k]}
        parts = [state, str(handle.dtype), layer, sorted(sites), opts, templates, __version__]
        names = ("weights", "dtype", "layer", "sites", "options", "templates", "version")
        params = dict(zip(names, parts, strict=True))
        return cache_key("values", None, params, show=("layer",)), digest(parts)[:16]

    def _path(self, scope: tuple[str, str], request: Any) -> Path:
        name = request_digest(request)
        return cache_path(self.root / scope[0], name, ".pt", legacy=self.root / scope[1] / f"{name}.pt")

    def get(self, scope: tuple[str, str], request: Any) -> Any:
        """The stored ValueResult of ``request``, or None (absent or unreadable)."""
        import torch

        from .values import ValueResult

        path = self._path(scope, request)
        if not path.exists():
            return None
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
            value = ValueResult(dict(doc["init"]), dict(doc["delta"]), [float(x) for x in doc["losses"]])
            if set(value.init) != set(value.delta) or not value.losses:
                raise ValueError("incomplete entry")
        except Exception as e:  # noqa: BLE001  (corrupt entries of any sort are recomputed)
            log.warning("ignoring the stored value at %s (%s); optimising it again", path, e)
            path.unlink(missing_ok=True)
            return None
        return value

    def put(self, scope: tuple[str, str], request: Any, value: Any) -> None:
        import torch

        own = {k: {s: t.detach().clone() for s, t in getattr(value, k).items()} for k in ("init", "delta")}
        doc = {**own, "losses": list(value.losses)}  # clones: never a view's whole storage
        cache_file(self._path(scope, request), lambda tmp: torch.save(doc, tmp), "a value")
