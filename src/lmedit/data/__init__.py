"""Benchmark datasets: real public files mapped to :class:`~lmedit.types.EditCase` records.

    from lmedit.data import load_dataset, list_datasets
    cases = load_dataset("counterfact", n=100)          # the first 100 valid records
    cases = load_dataset("zsre", n=50, offset=200)      # valid records 200..249

Each dataset module registers its loader with ``@register_dataset``; the modules are imported the first
time a dataset is looked up, so importing lmedit reads no file. Files are found by
:func:`~lmedit.data.paths.find_data_file`. Slicing: invalid records (e.g. ZsRE's empty ``alt``) are skipped
first, then ``records[offset : offset + n]`` of the remaining ones is returned.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..types import EditInputError
from .paths import find_data_file

log = logging.getLogger(__name__)

__all__ = ["DatasetError", "find_data_file", "get_dataset", "list_datasets", "load_dataset", "load_known",
           "load_mquake", "register_dataset"]


class DatasetError(EditInputError):
    """A data file or record that cannot be used; the message names the file, record index and field."""


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its file (relative to a data root), the loader that maps its records, and what
    a benchmark of it needs to know.

    ``kind`` describes the records for listings (``"edit"``, ``"multihop"``, ``"known"``); code outside this
    package reads the declarations instead: ``benchmark`` (its records are benchmark cases, each scored by
    the scorer its type names) and ``requests_per_case`` (edit requests a case applies together; MQuAKE-hard:
    4), which sizes slices and estimates costs.
    """

    name: str
    file: str
    loader: Callable[..., list]
    kind: str = "edit"
    description: str = ""
    benchmark: bool = True
    requests_per_case: int = 1


_DATASETS: dict[str, DatasetSpec] = {}
_discovered = False


def register_dataset(name: str, file: str, *, kind: str = "edit", description: str = "", benchmark: bool = True,
                     requests_per_case: int = 1):
    """Decorator for ``loader(file: Path, n: int | None, offset: int) -> list``: registers it as ``name``
    (see :class:`DatasetSpec` for the keywords)."""

    def deco(fn: Callable[..., list]) -> Callable[..., list]:
        if name in _DATASETS and _DATASETS[name].loader is not fn:
            raise ValueError(f"dataset name {name!r} is already registered")
        _DATASETS[name] = DatasetSpec(name, file, fn, kind, description, benchmark, requests_per_case)
        return fn

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "paths" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def get_dataset(name: str) -> DatasetSpec:
    """The registered dataset ``name``; an unknown name raises DatasetError listing the available ones."""
    _discover()
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, _DATASETS, n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DatasetError(f"unknown dataset {name!r}.{hint} Available: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name]


def load_dataset(name: str, *, n: int | None = None, offset: int = 0,
                 path: str | Path | None = None) -> list[Any]:
    """Load ``n`` benchmark cases of dataset ``name`` starting at valid record ``offset``: EditCase records,
    or the dataset's own multi-edit case type (MQuAKE), which the benchmark runner scores alike.

    Args:
        name: a registered dataset name (see :func:`list_datasets`).
        n: how many cases (None = all the rest).
        offset: how many valid records to skip first.
        path: an explicit file (or data folder) instead of the default search.
    """
    spec = get_dataset(name)
    if not spec.benchmark:
        raise DatasetError(f"dataset {name!r} holds {spec.kind} records, not benchmark cases; "
                           f"load it with lmedit.data.load_{name}()")
    return _load(spec, n, offset, path)


def load_mquake(n: int | None = None, offset: int = 0, path: str | Path | None = None) -> list:
    """MQuAKE multi-hop cases (see :mod:`lmedit.data.mquake`)."""
    spec = get_dataset("mquake")
    return _load(spec, n, offset, path)


def _load(spec: DatasetSpec, n: int | None, offset: int, path: str | Path | None) -> list:
    _check_slice(n, offset)
    cases = spec.loader(find_data_file(spec.file, path), n=n, offset=offset)
    if not cases and n != 0:
        raise DatasetError(f"dataset {spec.name!r} has no valid records from offset {offset} on; use a smaller "
                           "offset (`lmedit data` lists each dataset's size)")
    return cases


def load_known(n: int | None = None, path: str | Path | None = None) -> list:
    """ROME's known facts as ``(prompt, subject, attribute)`` records, for causal tracing."""
    spec = get_dataset("known")
    _check_slice(n, 0)
    return spec.loader(find_data_file(spec.file, path), n=n, offset=0)


def list_datasets() -> list[dict[str, Any]]:
    """One row per dataset: name, kind, file, record count and where it was found (or ``"missing"``).

    Never downloads.
    """
    _discover()
    rows = []
    for spec in sorted(_DATASETS.values(), key=lambda s: s.name):
        try:
            found = find_data_file(spec.file, download=False)
        except FileNotFoundError:
            rows.append({"name": spec.name, "kind": spec.kind, "file": spec.file, "records": None,
                         "where": "missing", "description": spec.description})
            continue
        rows.append({"name": spec.name, "kind": spec.kind, "file": spec.file, "records": len(read_records(found)),
                     "where": str(found), "description": spec.description})
    return rows


# --- helpers shared by the dataset modules ---------------------------------------------------------------

def _check_slice(n: int | None, offset: int) -> None:
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative integer, got {offset!r}")


def read_records(file: Path) -> list[dict[str, Any]]:
    """A JSON array file, or a JSON-lines file, as a list of records."""
    text = Path(file).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DatasetError(f"{file} is neither a JSON array nor JSON lines: {e}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{file} holds a JSON {type(data).__name__}; expected a list of records")
    return data


def require(record: Any, key: str, file: Path, index: int, kind: type | tuple[type, ...] | None = None) -> Any:
    """``record[key]`` (``key`` may be dotted, e.g. ``"portability.New Question"``), or a DatasetError;
    with ``kind``, a value of another type (``null``, a number where text belongs ...) is refused too."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            have = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DatasetError(f"{file} record {index}: missing field {key!r} (the record has {have})")
        value = value[part]
    if kind is not None and not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        got = "null" if value is None else f"a {type(value).__name__} ({value!r:.40})"
        raise DatasetError(f"{file} record {index}: field {key!r} is {got}, expected a {names}; fix the record, "
                           "or start after it (offset=)")
    return value


def select(records: list[Any], file: Path, n: int | None, offset: int,
           skip: Callable[[Any], str | None]) -> Iterator[tuple[int, Any]]:
    """(index, record) for valid records ``offset .. offset + n`` in file order.

    ``skip(record)`` returns a reason to skip an invalid record, or None. Skipped records are logged.
    """
    valid = 0
    skipped: list[str] = []
    for i, rec in enumerate(records):
        if n is not None and valid >= offset + n:
            break
        reason = skip(rec)
        if reason:
            skipped.append(f"{i} ({reason})")
            continue
        if valid >= offset:
            yield i, rec
        valid += 1
    if skipped:
        log.info("%s: skipped %d invalid record(s): %s", Path(file).name, len(skipped), ", ".join(skipped[:10]))


def build(file: Path, index: int, make: Callable[[], Any]) -> Any:
    """Run ``make()``; an input error (e.g. a subject missing from its prompt) is re-raised with file and index."""
    try:
        return make()
    except EditInputError as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{file} record {index}: {e}") from e
