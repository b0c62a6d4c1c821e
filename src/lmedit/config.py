"""Strict, typed configuration records for editors.

Every method has one ``Config`` dataclass. Loading is strict: an unknown key is an error that names the
known keys, and values are coerced to the field's declared type (so YAML's ``"5e-1"`` becomes a float once,
here, instead of in every method).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

log = logging.getLogger(__name__)

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says which and why."""


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: {value!r} matches none of {tp} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{name}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                pass
            else:
                if f.is_integer():
                    return int(f)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}: {value!r} is not a finite number; give a finite value")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How an editor runs, not what it computes: locations and speed settings. They are not part of a method's
    config, so they never enter :meth:`Config.hash` (a trained editor's checkpoint is identified by its
    content where results are cached). An editor holds them as ``editor.options``
    (``get_editor(name, options=RunOptions(...))``; the CLI's ``--value-cache``, ``--row-batch`` and
    ``--editor-checkpoint``).

    Attributes:
        value_cache: folder that keeps the optimised target values of the locate-then-edit editors and reuses
            them for the same weights, layer, value settings and request (None: no store).
        row_batch: requests whose values are optimised together in one batch of rows (locate editors, GRACE;
            None: 8). Speed only: results differ by rounding.
        checkpoint: a trained editor's directory written by ``lmedit train``.
    """

    value_cache: str | None = None
    row_batch: int | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.row_batch is not None and (not isinstance(self.row_batch, int) or self.row_batch < 1):
            raise ConfigError(f"row_batch must be a positive integer, got {self.row_batch!r}")
        for name in ("value_cache", "checkpoint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | Path):
                raise ConfigError(f"{name} must be a path, got {value!r}")
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))

    def merged(self, other: RunOptions | None) -> RunOptions:
        """These options with ``other``'s set (non-None) values on top."""
        if other is None:
            return self
        return dataclasses.replace(self, **{k: v for k, v in dataclasses.asdict(other).items() if v is not None})


QUIET_MOVED = frozenset({"checkpoint"})  # moved keys still documented as a way to name them: no warning


@dataclasses.dataclass
class Config:
    """Base class of every method configuration.

    Subclasses are dataclasses whose fields each carry a type, a default and a one-line ``help`` in their
    metadata. ``validate`` (override it) raises :class:`ConfigError` with an actionable message. Values are
    coerced to the field types and validated on construction, however the config is built
    (``MyConfig(lr="1e-3")`` and ``MyConfig.from_dict(...)`` alike).
    """

    # keys that older versions had in this config and that are run options now: key -> RunOptions field
    moved: ClassVar[dict[str, str]] = {}

    @classmethod
    def split_moved(cls, d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config values, run-option values) of a mapping that may hold keys that moved out of this config
        (an older config file, ``--set v_batch_size=8``); a moved key logs a deprecation warning."""
        values = dict(d)
        options = {}
        for key, field_name in cls.moved.items():
            if key in values:
                value = values.pop(key)
                if value is not None and key not in QUIET_MOVED:
                    log.warning("%s: %r is a run option now, not a method setting (RunOptions.%s; the CLI's "
                                "--%s); taking it from the config is deprecated", cls.__name__, key, field_name,
                                field_name.replace("_", "-"))
                if value is not None:
                    options[field_name] = value
        return values, options

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f, tp in type(self).field_types().items():
            setattr(self, f, _coerce(getattr(self, f), tp, f"{name}.{f}"))
        self.validate()

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Each field's name and its resolved type hint."""
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any] | None = None, **overrides: Any) -> C:
        """Build a config from a mapping; unknown keys raise, values are coerced to the field types."""
        merged = {**(d or {}), **overrides}
        types_ = cls.field_types()
        unknown = sorted(set(merged) - set(types_))
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(types_)}"
            )
        return cls(**merged)  # coerced and validated by __post_init__

    def replace(self: C, **overrides: Any) -> C:
        """A copy with ``overrides`` applied, checked like :meth:`from_dict`."""
        return type(self).from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The field values as plain JSON-serialisable data."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Raise ConfigError on values that cannot work; subclasses extend this."""

    def hash(self) -> str:
        """A short stable hash of the values that define the method, for cache keys (fields declared with
        ``option(..., identity=False)`` are left out: a trained editor's checkpoint path, identified by content
        where it matters, and speed settings whose results differ only by rounding). A field declared with
        ``added=True`` (added after results were cached, with the old behaviour as its default) counts only
        when it differs from its default, so the caches made before it existed stay valid."""
        values = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.metadata.get("identity", True)
                  and not (f.metadata.get("added") and getattr(self, f.name) == _default(f))}
        # its own JSON form rather than lmedit.digests.digest: a new formula would orphan every cached
        # cell and resumable run on disk
        blob = json.dumps({"type": type(self).__name__, **values}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        """Build a config from a YAML (``.yaml``/``.yml``) or JSON file, checked like :meth:`from_dict`."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        return cls.from_dict(data)

    @classmethod
    def describe_fields(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) rows for documentation and ``lmedit methods``."""
        rows = []
        for f in dataclasses.fields(cls):
            rows.append((f.name, str(cls.field_types()[f.name]), _default(f), f.metadata.get("help", "")))
        return rows


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for factories; None when it has none)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def option(default: Any, help: str, *, identity: bool = True, added: bool = False, **kw: Any) -> Any:
    """A config field with a default and a one-line help text; ``identity=False`` keeps it out of
    :meth:`Config.hash` (a location, or a speed setting, rather than a value of the method); ``added=True``
    hashes it only when it differs from its default (see :meth:`Config.hash`)."""
    meta = {"help": help, "identity": identity, "added": added}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)
