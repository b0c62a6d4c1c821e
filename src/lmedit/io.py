"""Files on disk: one way to write them atomically.

Every cache and run writer goes through here, so that a crash or a second process never leaves a half
written file where a finished one is expected.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def cache_file(path: Path, write: Callable[[Path], object], what: str) -> bool:
    """``write(tmp)`` to a unique temporary file beside ``path``, then rename it over ``path`` (atomic).

    For cache entries: a failure only logs (the value is computed again next time) and returns False.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("could not store %s in %s: %s", what, path.parent, e)
        return False
    return True
