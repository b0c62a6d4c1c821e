"""One table cell = one (method, dataset) benchmark run, and the on-disk cache that makes reruns cheap.

A cell is identified by its *key*: the base model's fingerprint, the method's resolved config hash, the
dataset slice (name, n, offset and a digest of the loaded cases), the setting (single / sequential with T
edits and its eval timing, batch size, seed) and the lmedit version. The cache lives under
``<out>/cells/<method>__<dataset>/``:

- ``key.json``  written before the run starts; a partial run is resumed only if it matches the new key;
- ``run-XXX/``  the run_benchmark output folder(s) (one per sequence of T edits in the sequential setting);
- ``cell.json`` written last, atomically, with a sha256 digest of its own body.

Reading a cell: a valid ``cell.json`` whose key matches is a hit; a mismatching key is stale (the folder is
wiped and recomputed); a ``cell.json`` that does not parse or whose digest does not match is corrupt and is
recomputed from scratch (nothing in that folder is trusted). Without ``cell.json`` the run was
interrupted: with a matching ``key.json`` run_benchmark resumes the finished cases.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..digests import digest, plain
from ..errors import LmeditError
from ..io import atomic_write, file_lock

log = logging.getLogger(__name__)

CELL_FILE = "cell.json"
KEY_FILE = "key.json"
SETTINGS = ("single", "sequential")
TIMINGS = ("final", "immediate")


class TableError(LmeditError, ValueError):
    """A table asked for with arguments that cannot make one; ``data["option"]`` names the argument."""


@dataclass(frozen=True)
class CellSpec:
    """What to run for one cell. Everything here is part of the cache key.

    Args:
        method: registered editor name.
        dataset: dataset name (``lmedit data``) or ``mquake`` for the multi-hop row.
        n: number of cases; offset: valid records skipped first.
        setting: ``single`` (edit, score, revert per case) or ``sequential`` (edits accumulate).
        edits: sequential only: T, the number of edits stacked before the model is reset.
        eval_timing: sequential only: score each case ``immediate``-ly after its edit or at the ``final`` model.
        batch_size: requests per ``compute`` call (batchable editors only).
        seed: torch / python RNG seed set at the start of the cell.
        overrides: editor config overrides, as sorted (key, value) pairs.
    """

    method: str
    dataset: str
    n: int
    offset: int = 0
    setting: str = "single"
    edits: int = 100
    eval_timing: str = "final"
    batch_size: int = 1
    seed: int = 0
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.eval_timing not in TIMINGS:
            raise ValueError(f"eval timing must be one of {TIMINGS}, got {self.eval_timing!r}")
        if self.n < 1 or self.offset < 0 or self.edits < 1 or self.batch_size < 1:
            raise ValueError("n, edits and batch size must be at least 1 and offset at least 0")

    @property
    def name(self) -> str:
        return f"{self.method}/{self.dataset}"

    @property
    def folder(self) -> str:
        return f"{self.method}__{self.dataset}"

    def config_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.overrides}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = self.config_overrides()
        return d


@dataclass
class CellResult:
    """The outcome of one cell: summary numbers, or the reason it could not run.

    Attributes:
        status: ``ok``, ``skipped`` (cannot run: the reason says why and what to do) or ``failed``.
        post / pre: metric name -> {"mean", "protocol", "cases"} after / before the edits.
        efficiency: seconds_per_edit, peak_memory_bytes, one_off_seconds, ... (whatever was measured).
        fields: dataset field -> number of cases that have it (explains missing metrics).
        key: the cache key fields; info: provenance (commit, model name, config, case count).
        cached: True when read from the cache instead of computed now.
    """

    spec: CellSpec
    status: str
    reason: str = ""
    post: dict[str, dict[str, Any]] = field(default_factory=dict)
    pre: dict[str, dict[str, Any]] = field(default_factory=dict)
    efficiency: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, int] = field(default_factory=dict)
    key: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("spec", "cached")}
        d["spec"] = self.spec.to_dict()
        return _finite(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any], spec: CellSpec) -> CellResult:
        known = {f.name for f in dataclasses.fields(cls)} - {"spec", "cached"}
        return cls(spec=spec, **{k: v for k, v in d.items() if k in known})


def _finite(obj: Any) -> Any:
    """NaN/inf become None so the JSON is standard (a NaN mean means 'no case had this metric')."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def cases_digest(cases: list[Any]) -> str:
    """Identity of a dataset slice by content, so an edited data file or loader makes the cell stale."""
    return digest([plain(c) for c in cases])[:16]


def lmedit_version() -> str:
    from .. import __version__

    return __version__


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def cell_key(spec: CellSpec, *, fingerprint: str, config_hash: str, data_digest: str,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields that decide whether a cached cell is still valid."""
    key = {"spec": spec.to_dict(), "model_fingerprint": fingerprint, "config_hash": config_hash,
           "data_digest": data_digest, "lmedit_version": lmedit_version(), **(extra or {})}
    return json.loads(json.dumps(_finite(key), default=str))  # the form it takes after a JSON round trip


class CellCache:
    """Cells stored under ``root/cells/``; see the module docstring for the states a cell folder can be in."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "cells"

    def folder(self, spec: CellSpec) -> Path:
        return self.root / spec.folder

    def locked(self, spec: CellSpec):
        """Hold the cell's OS lock while it is read, computed and stored (``LockedError`` when another process
        computes it). The lock file sits beside the cell folder, which :meth:`wipe` may delete."""
        return file_lock(self.root / f".{spec.folder}.lock", what=f"table cell {spec.name} ({self.folder(spec)})")

    def load(self, spec: CellSpec, key: dict[str, Any]) -> CellResult | None:
        """The cached result if it is intact and its key matches; otherwise None (after cleaning up)."""
        path = self.folder(spec) / CELL_FILE
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            body = doc["body"]
            if doc["sha256"] != digest(body):
                raise ValueError("digest mismatch")
            result = CellResult.from_dict(body, spec)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("cell %s: cache entry %s is corrupt (%s); recomputing it from scratch", spec.name, path, e)
            self.wipe(spec)
            return None
        if result.key != key:
            changed = sorted(k for k in set(key) | set(result.key) if key.get(k) != result.key.get(k))
            log.info("cell %s: cached result is stale (%s changed); recomputing", spec.name, ", ".join(changed))
            self.wipe(spec)
            return None
        result.cached = True
        return result

    def prepare(self, spec: CellSpec, key: dict[str, Any]) -> tuple[Path, bool]:
        """The folder to run in, and whether a partial run there may be resumed (its key.json matches)."""
        folder = self.folder(spec)
        key_path = folder / KEY_FILE
        resume = False
        if key_path.exists():
            try:
                resume = json.loads(key_path.read_text()) == key
            except (OSError, ValueError):
                resume = False
            if not resume:
                log.info("cell %s: partial run has another key; starting over", spec.name)
                self.wipe(spec)
        folder.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write(key_path, json.dumps(key, sort_keys=True, indent=1))
        return folder, resume

    def store(self, result: CellResult) -> None:
        body = result.to_dict()
        doc = {"sha256": digest(body), "body": body}
        atomic_write(self.folder(result.spec) / CELL_FILE, json.dumps(doc, indent=1, sort_keys=True))

    def wipe(self, spec: CellSpec) -> None:
        shutil.rmtree(self.folder(spec), ignore_errors=True)


