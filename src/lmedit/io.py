"""Files that survive crashes and concurrent runs: one atomic write, one OS file lock, the cache folders.

- :func:`atomic_write` (and :func:`cache_file`, its form for cache entries) -- a file is either its old
  content or its new content, never half of one: the data goes to a unique temporary file in the same
  folder (``tempfile``), is flushed to disk (``fsync``) and then renamed over the target (``os.replace``,
  atomic on POSIX).
- :func:`append_jsonl` / :func:`read_jsonl` -- run records appended line by line and flushed; a line torn by
  a crash while it was written stays alone on its line and is dropped when read.
- :func:`file_lock` -- an advisory OS lock (``fcntl.flock``) on a lock file. Non-blocking by default: a
  second process gets :class:`LockedError` naming what is locked and, when it can be read, the process that
  holds it. The OS drops the lock when its holder exits, even after ``kill -9``: a stale lock file is never
  a problem, so lock files are left in place (deleting them would race with a new holder).
- :func:`lmedit_home` / :func:`cache_folder` -- where lmedit keeps converted models and disk caches;
  :func:`offline` -- whether downloads are forbidden.
- :func:`cache_key` / :func:`cache_path` -- the one naming scheme of disk cache entries: a readable prefix
  (the kind and the parameters worth seeing) and a short hash of everything the entry depends on (kind,
  model fingerprint, parameters). An entry written under an older name is found there and linked to its new name.

Core layer: imports nothing from lmedit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lmedit.lock"

_UMASK = os.umask(0)
os.umask(_UMASK)


_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth


class LockedError(RuntimeError):
    """Another process holds the lock on a run directory, table cell or cache file."""


def lmedit_home() -> Path:
    """Cache root: ``$LMEDIT_HOME`` or ``~/.cache/lmedit``."""
    return Path(os.environ.get("LMEDIT_HOME", Path.home() / ".cache" / "lmedit")).expanduser()


def offline() -> bool:
    """True when downloads are forbidden (``HF_HUB_OFFLINE=1`` or ``LMEDIT_OFFLINE=1``)."""
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "LMEDIT_OFFLINE"))
    return any(f in ("1", "true", "yes") for f in flags)


def cache_folder(*parts: str) -> Path:
    """A folder under :func:`lmedit_home` (not created)."""
    return lmedit_home().joinpath(*parts)


def cache_key(kind: str, fingerprint: str | None, params: Mapping[str, object], show: Sequence[str] = ()) -> str:
    """The file-name stem of a disk cache entry: ``<kind>-<fingerprint>-<shown params>-<hash>``.

    Args:
        kind: what is cached (``mom2``, ``embedding-std``, ...).
        fingerprint: the model the entry belongs to (``ModelHandle.fingerprint``), or None (an entry of no
            model, or one in a folder of the model's own).
        params: everything else the entry depends on (JSON-serialisable; order does not matter).
        show: names of ``params`` written into the name for people, as ``<name><value>``.
    Returns:
        e.g. ``mom2-layer3-tokens100000-float32-1f0c2a9b4e7d6c51``: the hash (16 hex digits of a sha256 of the
        canonical JSON of kind, fingerprint and params) alone identifies the entry.
    """
    blob = json.dumps({"kind": kind, "fingerprint": fingerprint, "params": dict(params)}, sort_keys=True,
                      separators=(",", ":"), default=str)
    shown = [f"{k}{params[k]}" for k in show]
    parts = [kind, *([fingerprint] if fingerprint else []), *shown, hashlib.sha256(blob.encode()).hexdigest()[:16]]
    return "-".join(parts).replace("/", "_")


def cache_path(folder: str | Path, key: str, suffix: str, *, legacy: Path | None = None) -> Path:
    """``folder/<key><suffix>``. When it does not exist but ``legacy`` (the entry's name under an older
    naming scheme) does, the old file is linked (hard link; a copy where links are refused) to the new name
    first, so nothing computed before is lost, and the old name stays for older lmedit versions sharing the
    cache."""
    path = Path(folder) / f"{key}{suffix}"
    if legacy is not None and not path.exists() and legacy.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(legacy, path)
        except FileExistsError:  # another process migrated it first
            pass
        except OSError:  # a file system without hard links
            atomic_write(path, legacy.read_bytes())
        log.info("cache entry %s is now also %s (the current naming scheme)", legacy, path)
    return path


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened / synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], object], *,
                 encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``data`` atomically; returns ``path``.

    ``data`` is text, bytes, or a function that writes the file at the path it is given (``torch.save``,
    ``safetensors.torch.save_file`` ...). On any error the temporary file is removed and ``path`` keeps its
    old content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            blob = data.encode(encoding) if isinstance(data, str) else bytes(data)
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def cache_file(path: Path, write: Callable[[Path], object], what: str) -> bool:
    """:func:`atomic_write` for cache entries: a failure only logs (the value is computed again next time)
    and returns False."""
    try:
        atomic_write(path, write)
    except OSError as e:
        log.warning("could not store %s in %s: %s", what, Path(path).parent, e)
        return False
    return True


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return f" (held by {text})" if text else ""


@contextlib.contextmanager
def file_lock(path: str | Path, *, what: str | None = None, blocking: bool = False,
              tidy: bool = False) -> Iterator[Path]:
    """Hold an exclusive OS lock on the file ``path`` (created if needed) inside the block.

    Args:
        what: how the error names the locked thing (default: the lock file's folder).
        blocking: wait for the holder instead of raising (for caches: the second process then reads what
            the first one wrote).
        tidy: on release, if the lock file is alone in its folder, remove both (still holding the lock, so no
            other process can take a lock on the removed file): a run that stopped before writing anything
            leaves no folder behind.

    Re-entrant within one process: a nested ``file_lock`` on a path this process already holds just enters.

    Raises:
        LockedError: non-blocking, and another process (or another open of the same file) holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:  # re-entrant within this process (e.g. the CLI locks before run_benchmark does)
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            name = what or str(path.parent)
            raise LockedError(
                f"{name} is in use by another lmedit process{_holder(path)}; wait for it to finish, or use "
                f"another folder (the lock is released when that process exits; lock file: {path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                if tidy and [p.name for p in path.parent.iterdir()] == [path.name]:
                    path.unlink()
                    path.parent.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def folder_lock(folder: str | Path, *, what: str | None = None, blocking: bool = False
                ) -> contextlib.AbstractContextManager[Path]:
    """:func:`file_lock` on ``folder/.lmedit.lock``: one process per folder. A folder created here is removed
    again on release when nothing but the lock file was written into it."""
    folder = Path(folder)
    return file_lock(folder / LOCK_FILE, what=what or f"folder {folder}", blocking=blocking,
                     tidy=not folder.exists())


def read_jsonl(path: Path | None) -> list[dict]:
    """The records of a JSON-lines file (none when it does not exist); a torn line is dropped with a warning."""
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: dropping a torn line (an earlier run stopped while writing it)", path)
    return out


def append_jsonl(path: Path | None, records: Sequence[Mapping]) -> None:
    """Append ``records`` to a JSON-lines file, one line each, and flush; nothing when ``path`` is None."""
    if path is None or not records:
        return
    text = "".join(json.dumps(r, default=str) + "\n" for r in records)
    with open(path, "ab") as f:
        if f.tell():
            with open(path, "rb") as r:
                r.seek(-1, 2)
                if r.read(1) != b"\n":
                    f.write(b"\n")  # a torn last line stays alone on its line (and is dropped when read)
        f.write(text.encode("utf-8"))
        f.flush()
