"""The server's edit log: SQLite (stdlib ``sqlite3``, WAL mode) plus each Edit saved beside it.

Layout of a store folder::

    log.sqlite3        one row per edit ever applied (applied or undone), in the order applied
    edits/<folder>/    the Edit in lmedit's format (edit.json + tensors.safetensors)
    lock               held (flock) by the one server that uses the folder

An edit counts once its row is committed. Its files are written (and fsynced) *before* the row, so a crash
leaves either a committed row with its files, or files with no row; :meth:`EditStore.open` deletes the
latter. Folder names and ids are made here, never taken from a request.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DB_FILE = "log.sqlite3"
EDITS_DIR = "edits"
LOCK_FILE = "lock"
APPLIED, UNDONE = "applied", "undone"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edits (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('applied', 'undone')),
    source TEXT NOT NULL,
    method TEXT NOT NULL,
    kind TEXT NOT NULL,
    requests TEXT NOT NULL,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    folder TEXT NOT NULL,
    state_before TEXT NOT NULL,
    state_after TEXT NOT NULL,
    created REAL NOT NULL,
    undone REAL,
    compute_seconds REAL,
    peak_rss_bytes INTEGER,
    report TEXT NOT NULL
);
"""


class StoreError(RuntimeError):
    """The store folder cannot be used as asked (another model's log, in use, inconsistent)."""


@dataclass
class EditRecord:
    """One row of the log. ``report`` holds what the page shows: scores, continuations, the case."""

    id: str
    status: str
    source: str
    method: str
    kind: str
    requests: list[dict[str, Any]]
    config: dict[str, Any]
    config_hash: str
    folder: str
    state_before: str
    state_after: str
    created: float
    undone: float | None = None
    compute_seconds: float | None = None
    peak_rss_bytes: int | None = None
    report: dict[str, Any] = field(default_factory=dict)
    seq: int | None = None

    def public(self) -> dict[str, Any]:
        """The record as the API returns it (no folder names)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("folder", "seq")}
        d["object"] = "edit"
        return d


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EditStore:
    """The log of one store folder, for one base model. Open it with :meth:`open`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.edits_dir = self.folder / EDITS_DIR
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    # --- opening ---------------------------------------------------------------------------------
    def open(self, model_name: str, model_fingerprint: str, base_state: str) -> EditStore:
        """Lock the folder, create or check the log (it must belong to this base model), drop orphans."""
        self.edits_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreError(f"store {self.folder} is in use by another lmedit serve; stop it or pass "
                             "another --store") from None
        self._db = sqlite3.connect(self.folder / DB_FILE, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        info = dict(self._db.execute("SELECT key, value FROM info").fetchall())
        if not info:
            with self._tx() as db:
                db.executemany("INSERT INTO info VALUES (?, ?)", [
                    ("model_name", model_name), ("model_fingerprint", model_fingerprint),
                    ("base_state", base_state), ("created", str(time.time()))])
        elif info.get("model_fingerprint") != model_fingerprint or info.get("base_state") != base_state:
            self.close()
            raise StoreError(
                f"store {self.folder} holds edits of model {info.get('model_name')!r} (fingerprint "
                f"{info.get('model_fingerprint')}, weights {info.get('base_state')}), not of {model_name!r} "
                f"(fingerprint {model_fingerprint}, weights {base_state}); pass another --store for this model")
        self._drop_orphans()
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def info(self) -> dict[str, str]:
        return dict(self._conn().execute("SELECT key, value FROM info").fetchall())

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the edit store is closed")
        return self._db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _drop_orphans(self) -> None:
        """Delete edit folders that no row names: left by a crash before their row was committed, or
        replaced by a rebuild."""
        known = {r[0] for r in self._conn().execute("SELECT folder FROM edits")}
        for p in self.edits_dir.iterdir():
            if p.name not in known:
                log.info("removing %s: no committed edit refers to it", p)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    # --- files -------------------------------------------------------------------------------------
    def write_edit(self, edit: Any, folder: str) -> Path:
        """Save ``edit`` under ``edits/<folder>`` (via a temporary name, fsynced); no row yet."""
        final = self.edits_dir / folder
        tmp = self.edits_dir / f"{folder}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        edit.save(tmp)
        _fsync_tree(tmp)
        os.replace(tmp, final)
        return final

    def discard(self, folder: str) -> None:
        shutil.rmtree(self.edits_dir / folder, ignore_errors=True)

    def path_of(self, record: EditRecord) -> Path:
        return self.edits_dir / record.folder

    # --- rows --------------------------------------------------------------------------------------
    def add(self, record: EditRecord) -> EditRecord:
        """Commit one applied edit (one transaction); its files must already be written."""
        cols = [k for k in record.__dict__ if k != "seq"]
        values = [self._encode(k, getattr(record, k)) for k in cols]
        with self._tx() as db:
            cur = db.execute(f"INSERT INTO edits ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values)
            record.seq = cur.lastrowid
        return record

    def mark_undone(self, ids: list[str], rebuilt: list[EditRecord]) -> None:
        """Mark ``ids`` undone and store the rebuilt later edits (new folder, states), in one transaction."""
        now = time.time()
        with self._tx() as db:
            db.executemany("UPDATE edits SET status = ?, undone = ? WHERE id = ? AND status = ?",
                           [(UNDONE, now, i, APPLIED) for i in ids])
            db.executemany(
                "UPDATE edits SET folder = ?, state_before = ?, state_after = ?, config = ?, config_hash = ?, "
                "report = ? WHERE id = ?",
                [(r.folder, r.state_before, r.state_after, self._encode("config", r.config), r.config_hash,
                  self._encode("report", r.report), r.id) for r in rebuilt])

    def records(self, status: str | None = None) -> list[EditRecord]:
        """Rows in the order applied (``status`` filters)."""
        sql = "SELECT * FROM edits" + (" WHERE status = ?" if status else "") + " ORDER BY seq"
        cur = self._conn().execute(sql, (status,) if status else ())
        names = [d[0] for d in cur.description]
        return [self._decode(dict(zip(names, row, strict=True))) for row in cur.fetchall()]

    def get(self, edit_id: str) -> EditRecord | None:
        cur = self._conn().execute("SELECT * FROM edits WHERE id = ?", (edit_id,))
        row = cur.fetchone()
        return None if row is None else self._decode(dict(zip([d[0] for d in cur.description], row, strict=True)))

    @staticmethod
    def _encode(key: str, value: Any) -> Any:
        return json.dumps(value, default=str) if key in ("requests", "config", "report") else value

    @staticmethod
    def _decode(row: dict[str, Any]) -> EditRecord:
        for k in ("requests", "config", "report"):
            row[k] = json.loads(row[k])
        return EditRecord(**row)
