"""Where benchmark data files are found, and (only when allowed) fetched from their public source.

Search order for a file named by its path relative to a data root (e.g. ``zsre/zsre_mend_eval_1000.json``):

1. an explicit ``path`` (a file, or a data root directory holding ``<relative>``);
2. ``$LMEDIT_DATA/<relative>``;
3. ``../shared/data/<relative>`` next to the current directory, then next to the repository root (found by
   walking up from this package's location);
4. the download cache ``$LMEDIT_HOME/data/<relative>`` (default ``~/.cache/lmedit/data``);
5. unless offline (``HF_HUB_OFFLINE=1`` or ``LMEDIT_OFFLINE=1``), a download of the file's public source
   (:data:`SOURCES`) into that cache.

A file that is still missing raises :class:`FileNotFoundError` naming every place searched.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

from ..errors import LmeditError
from ..io import atomic_write, cache_folder, file_lock, offline  # noqa: F401  (offline: re-exported)

log = logging.getLogger(__name__)

_RAW = "https://raw.githubusercontent.com"
_ROME = "https://rome.baulab.info/data/dsets"
_KS = f"{_RAW}/Jometeorie/KnowledgeSpread/51d7402617c2e52bde0dc11b76e400c3725a181a/data"
_WT = f"{_RAW}/pytorch/examples/d5678bc8ac0cdd79dbd5e44d4130271018bcec4e/word_language_model/data/wikitext-2"

# relative path -> public URL. Where the shared copy is a prefix of a bigger upstream file, the URL is the
# full upstream file (a superset in the same order; loaders slice it with n/offset).
SOURCES: dict[str, str] = {
    "zsre/zsre_mend_eval_1000.json": f"{_ROME}/zsre_mend_eval.json",
    "zsre/zsre_mend_train_1k.json": f"{_KS}/zsre/zsre_mend_train-1k.json",
    "counterfact/easyedit_counterfact-edit.json": f"{_KS}/counterfact/counterfact-edit.json",
    "counterfact/easyedit_counterfact-train.json": f"{_KS}/counterfact/counterfact-train.json",
    "counterfact/counterfact.json": f"{_ROME}/counterfact.json",
    "portability/zsre_mend_eval_portability_gpt4_800.json":
        f"{_RAW}/shariqahn/EasyEdit/d71c0bc5c07199d97da8fd31fe09f5c1b6a9518a/data/notebook/"
        "zsre_mend_eval_portability_gpt4.json",
    "portability/MQuAKE-hard_300.json":
        f"{_RAW}/Alanzxd/memit_for_mquake/7d658a522b3988b18bd1cdc22335837303223f42/data/MQuAKE-hard.json",
    "misc/known_1000.json": f"{_ROME}/known_1000.json",
    "qaedit/QAEdit_inter_1k_800.json":
        f"{_RAW}/WanliYoung/Revisit-Editing-Evaluation/d6025e0ee9731d3b59b84ea242dc06bf0e0c8a74/data/QAEdit_inter_1k.json",
    "corpus/wikitext-2_valid.tokens.txt": f"{_WT}/valid.txt",
    "corpus/wikitext-2_test.tokens.txt": f"{_WT}/test.txt",
}

DOWNLOAD_TIMEOUT_S = 20.0



class DataFileNotFoundError(LmeditError, FileNotFoundError):
    """A data file that is in none of the places lmedit looks; ``data["option"]`` names the argument."""


def cache_dir() -> Path:
    """The download cache: ``$LMEDIT_HOME/data`` (default ``~/.cache/lmedit/data``)."""
    return cache_folder("data")


def repo_root() -> Path | None:
    """The checkout this package runs from (a folder with pyproject.toml or .git above it), if any."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").exists() or (parent / ".git").exists():
            return parent
    return None


def candidates(relative: str) -> list[Path]:
    """The places searched for ``relative`` after an explicit path, in order."""
    out: list[Path] = []
    env = os.environ.get("LMEDIT_DATA")
    if env:
        out.append(Path(env).expanduser() / relative)
    out.append(Path.cwd().parent / "shared" / "data" / relative)
    root = repo_root()
    if root is not None:
        out.append(root.parent / "shared" / "data" / relative)
    out.append(cache_dir() / relative)
    # the same folder reached two ways is searched once
    seen: set[str] = set()
    uniq = []
    for p in out:
        key = str(p.resolve()) if p.parent.exists() else str(p)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def find_data_file(relative: str, path: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Locate a data file (see the module docstring for the search order).

    Args:
        relative: the file's path under a data root, e.g. ``"counterfact/easyedit_counterfact-edit.json"``.
        path: an explicit file, or a folder holding ``relative`` (a data root) or the file itself. When given
            it must exist: an explicit choice is never silently replaced by another copy.
        download: allow step 5 (still subject to the offline switches).
    """
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        for inside in (p / relative, p / Path(relative).name):  # a data root, or the file's own folder
            if p.is_dir() and inside.is_file():
                return inside
        where = f"{p} (nor {p / relative})" if p.is_dir() else str(p)
        raise FileNotFoundError(f"data file not found at the given path {where}; pass an existing file, or a "
                                f"data folder that contains {relative}")
    searched = candidates(relative)
    for p in searched:
        if p.is_file():
            log.debug("found %s at %s", relative, p)
            return p
    url = SOURCES.get(relative)
    notes = []
    if url and download and not offline():
        try:
            return _download(url, cache_dir() / relative)
        except OSError as e:  # network errors, timeouts, HTTP errors (urllib raises OSError subclasses)
            notes.append(f"Downloading {url} failed: {e}")
    elif url and download:
        notes.append(f"Not downloading {url}: HF_HUB_OFFLINE or LMEDIT_OFFLINE is set.")
    raise DataFileNotFoundError("\n".join([
        f"data file {relative!r} not found. Searched:", *(f"  {p}" for p in searched), *notes,
        "Fix: set LMEDIT_DATA to the folder that holds it (e.g. export LMEDIT_DATA=/path/to/shared/data), "
        "or pass path= with the file or its data folder.",
    ]), option="data")


def _download(url: str, dest: Path) -> Path:
    """Fetch ``url`` to ``dest`` atomically (a partial download never looks like a finished file)."""
    log.info("downloading %s -> %s", url, dest)

    def fetch(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:  # noqa: S310
            while chunk := resp.read(1 << 20):
                f.write(chunk)

    with file_lock(dest.with_name(f".{dest.name}.lock"), what=f"download of {dest.name}", blocking=True):
        if not dest.exists():  # another process fetched it while this one waited
            atomic_write(dest, fetch)
    return dest
