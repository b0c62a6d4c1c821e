"""MkDocs hook (mkdocs.yml ``hooks:``): every public object the API pages document must have a docstring.

mkdocstrings silently leaves an object without a docstring out of the page, so a missing docstring would
never fail ``mkdocs build --strict`` by itself. This hook reads the ``::: identifier`` lines of
``docs/api/*.md``, loads each identifier with griffe (the loader mkdocstrings uses) and walks it: the
object itself, and for a module or class its public functions, classes and methods (public in griffe's
sense: no leading underscore, and listed in ``__all__`` where the module has one; attributes and dunder
methods are not checked; a method overriding a documented method of a base class inherits its docstring).
Any of them without a docstring stops the build with their list.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe
from mkdocs.exceptions import PluginError

_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)


def identifiers(api_dir: Path) -> list[str]:
    """The ``::: identifier`` targets of every page in ``api_dir``, in page order."""
    return [m.group(1) for page in sorted(api_dir.glob("*.md")) for m in _DIRECTIVE.finditer(page.read_text())]


def _documented(obj: griffe.Object) -> bool:
    return bool(obj.docstring and obj.docstring.value.strip())


def _inherits_docstring(method: griffe.Object) -> bool:
    """A method that overrides a documented method of a base class keeps that method's documentation
    (as ``inspect.getdoc`` does)."""
    owner = method.parent
    if not (owner is not None and owner.is_class):
        return False
    try:
        bases = owner.mro()
    except Exception:  # a base outside the loaded packages: nothing to inherit from
        return False
    return any(method.name in base.members and _documented(base.members[method.name]) for base in bases)


def missing_docstrings(obj: griffe.Object) -> list[str]:
    """Paths of ``obj`` and of its public functions, classes and methods that have no docstring."""
    out = [] if _documented(obj) or (obj.is_function and _inherits_docstring(obj)) else [obj.path]
    if obj.is_module or obj.is_class:
        for name, member in obj.members.items():
            if member.is_alias or name.startswith("__") or not member.is_public:
                continue
            if member.is_class or member.is_function:
                out += missing_docstrings(member)
    return out


def check(api_dir: Path, src: Path) -> list[str]:
    """Every undocumented public object reachable from the API pages (empty when all are documented)."""
    loader = griffe.GriffeLoader(search_paths=[str(src)])
    missing: list[str] = []
    for ident in identifiers(api_dir):
        package = ident.split(".", 1)[0]
        if package not in loader.modules_collection:
            loader.load(package)
        missing += missing_docstrings(loader.modules_collection.get_member(ident))
    return sorted(set(missing))


def on_pre_build(config, **kwargs) -> None:
    docs = Path(config["docs_dir"])
    missing = check(docs / "api", docs.parent / "src")
    if missing:
        raise PluginError("public API objects without a docstring (write one; the API reference is built "
                          "from them):\n  " + "\n  ".join(missing))
