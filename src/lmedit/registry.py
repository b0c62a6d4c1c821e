"""Editor registry: ``@register_editor("name")`` on the class is the only registration step.

Importing lmedit loads no method: the method modules under ``lmedit.methods`` (and any package that
declares the ``lmedit.editors`` entry-point group) are imported the first time an editor is looked up.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .methods.base import Editor

log = logging.getLogger(__name__)

_EDITORS: dict[str, type[Editor]] = {}
_discovered = False
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
BUILTIN_METHODS = "lmedit.methods"  # package whose modules are imported on the first look-up


class UnknownMethodError(KeyError):
    """No editor is registered under this name; the message lists close matches and the known names."""
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


def register_editor(name: str):
    """Class decorator: register an :class:`~lmedit.methods.base.Editor` subclass under ``name``."""

    def deco(cls: type[Editor]) -> type[Editor]:
        if not _NAME.match(name):
            raise ValueError(f"editor name {name!r} must be lower-case letters, digits, '-' or '_'")
        if name in _EDITORS and _EDITORS[name] is not cls:
            raise ValueError(f"editor name {name!r} is already taken by {_EDITORS[name].__qualname__}")
        cls.name = name
        _EDITORS[name] = cls
        return cls

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    # the built-in methods are found like plugins, by package name: the registry (a core module) depends on
    # no method, and every method depends on it (its decorator)
    methods = importlib.import_module(BUILTIN_METHODS)
    for info in pkgutil.walk_packages(methods.__path__, prefix=f"{BUILTIN_METHODS}."):
        if info.name.rsplit(".", 1)[-1].startswith("_") or info.name.endswith(".base"):
            continue
        importlib.import_module(info.name)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="lmedit.editors"):
            ep.load()
    except Exception as e:  # noqa: BLE001  (a broken third-party plugin must not break lmedit)
        log.warning("could not load lmedit.editors plugins: %s", e)


def list_editors() -> list[str]:
    """The names of every registered editor, sorted."""
    _discover()
    return sorted(_EDITORS)


def editor_class(name: str) -> type[Editor]:
    """The editor class registered as ``name`` (any case); an unknown name raises UnknownMethodError."""
    _discover()
    key = name.lower()
    if key not in _EDITORS:
        close = difflib.get_close_matches(key, _EDITORS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownMethodError(f"unknown editing method {name!r}.{hint} Available: {', '.join(sorted(_EDITORS))}")
    return _EDITORS[key]


def get_editor(name: str, config: Any = None, *, options: Any = None, **overrides: Any) -> Editor:
    """An editor instance. ``config`` may be a Config, a dict, or a path to a YAML/JSON file; ``options`` a
    :class:`~lmedit.config.RunOptions` (caches, speed settings, a trained editor's checkpoint)."""
    return editor_class(name)(config, options=options, **overrides)
