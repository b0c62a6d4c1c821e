"""Module swaps: edits that install modules in place of others (SERAC, CaliNet, T-Patcher ...).

A :class:`ModuleSwap` wraps each replaced module in a :class:`SwapModule` and removes it cleanly on revert.
A saved swap stores, per module path, the *registered name* of its module class (:func:`register_swap_module`),
the constructor config and the module's own tensors; loading builds the class registered under that name
(never a class path read from the file), checks on the meta device that the config gives exactly the saved
tensors' names, shapes and dtypes, and loads them with ``strict=True``. Re-exported by :mod:`lmedit.edits`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .edit_format import malformed
from .edits import Edit, EditError, EditMismatchError
from .hooks import get_module, set_module

if TYPE_CHECKING:
    from .models.handle import ModelHandle


class SwapModule(nn.Module):
    """Base class of modules that a :class:`ModuleSwap` installs in place of an existing module.

    The replaced module is kept as ``self.base`` while installed. Subclasses implement ``forward`` (usually
    calling ``self.base``) and ``get_config()`` (constructor kwargs, JSON-serialisable), so that a saved edit
    can rebuild them; only the subclass's own parameters are saved.
    """

    def __init__(self) -> None:
        super().__init__()
        self.base: nn.Module | None = None

    def get_config(self) -> dict[str, Any]:
        """The constructor keyword arguments (JSON-serialisable) that rebuild this module on load."""
        return {}

    def bind(self, handle: ModelHandle) -> None:
        """Called by :meth:`ModuleSwap.apply` before installing: modules that need the handle (its tokenizer,
        adapter or caches) at run time take it here; it is never saved."""

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's own tensors, without the wrapped ``base`` module's (what a saved edit stores)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}


_SWAP_MODULES: dict[str, type[SwapModule]] = {}
_SWAP_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


def register_swap_module(name: str):
    """Class decorator: let saved :class:`ModuleSwap` edits hold this :class:`SwapModule` class as ``name``.

    The only way a loaded edit gets a module class: the file names a registered name, and an unknown name is
    refused (nothing is imported from a path read from a file).
    """

    def deco(cls: type[SwapModule]) -> type[SwapModule]:
        if not (isinstance(cls, type) and issubclass(cls, SwapModule)):
            raise TypeError(f"register_swap_module: {cls!r} is not a SwapModule subclass")
        if not _SWAP_NAME.match(name):
            raise ValueError(f"swap module name {name!r} must be lower-case letters, digits, '.', '-' or '_'")
        if _SWAP_MODULES.get(name, cls) is not cls:
            raise ValueError(f"swap module name {name!r} is already taken by {_SWAP_MODULES[name].__qualname__}")
        _SWAP_MODULES[name] = cls
        return cls

    return deco


def swap_module_name(cls: type[SwapModule]) -> str:
    """The registered name of a swap module class (saving an unregistered one is refused)."""
    for name, known in _SWAP_MODULES.items():
        if known is cls:
            return name
    raise EditError(f"{cls.__qualname__} is not a registered swap module, so an edit holding it cannot be saved; "
                    "decorate the class with @register_swap_module('name')")


def swap_module_class(name: Any) -> type[SwapModule]:
    """The swap module class registered as ``name`` (the method modules are imported first if needed)."""
    if isinstance(name, str) and name not in _SWAP_MODULES:
        from .registry import list_editors

        list_editors()  # imports lmedit's own method modules (a fixed list), which register their modules
    if not isinstance(name, str) or name not in _SWAP_MODULES:
        raise malformed(f"names swap module {name!r}, which is not registered (known: {sorted(_SWAP_MODULES)})")
    return _SWAP_MODULES[name]


class ModuleSwap(Edit):
    """Modules installed at given paths, each wrapping the module it replaces."""

    kind = "module_swap"

    def __init__(self, modules: dict[str, SwapModule], meta: dict[str, Any] | None = None) -> None:
        super().__init__(meta)
        if not modules:
            raise EditError("a ModuleSwap needs at least one module")
        self.modules = dict(modules)

    def _apply(self, handle: ModelHandle, strict: bool,
               max_relative_update: float | None) -> list[tuple[str, nn.Module]]:
        for path, m in self.modules.items():
            for name, p in m.own_state_dict().items():
                if p.is_floating_point() and not torch.isfinite(p).all():
                    raise EditError(f"refusing edit: module for {path} has NaN/inf in {name}")
        installed: list[tuple[str, nn.Module]] = []
        try:
            for path, m in self.modules.items():
                try:
                    original = get_module(handle.model, path)
                except LookupError:
                    raise EditMismatchError(f"this edit installs a module at {path!r}, which {handle.name!r} does "
                                            "not have; apply it to the model it was computed for") from None
                ref = next(original.parameters(), None)
                if ref is not None:
                    m.to(device=ref.device)
                m.base = original
                m.bind(handle)
                set_module(handle.model, path, m)
                installed.append((path, original))
        except Exception:
            self._revert(handle, installed)
            raise
        return installed

    def _revert(self, handle: ModelHandle, installed: list[tuple[str, nn.Module]]) -> None:
        for path, original in reversed(installed):
            set_module(handle.model, path, original)
            self.modules[path].base = None

    def _to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        body: dict[str, Any] = {"modules": {}}
        for path, m in self.modules.items():
            cls = type(m)
            body["modules"][path] = {"module": swap_module_name(cls), "config": m.get_config()}
            for name, t in m.own_state_dict().items():
                tensors[f"{path}::{name}"] = t
        return tensors, body

    @classmethod
    def _from_state(cls, meta: dict, body: dict, tensors: dict[str, torch.Tensor]) -> ModuleSwap:
        specs = body.get("modules")
        if not isinstance(specs, dict) or not specs:
            raise malformed("body.modules must map module paths to {'module': name, 'config': {...}}")
        modules: dict[str, SwapModule] = {}
        for path, spec in specs.items():
            if not isinstance(spec, dict) or set(spec) != {"module", "config"} or not isinstance(spec["config"], dict):
                raise malformed(f"module at {path!r} must be {{'module': registered name, 'config': {{...}}}}")
            klass = swap_module_class(spec["module"])
            own = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{path}::")}
            with torch.device("meta"):  # shapes first: a config cannot make the loader allocate what it likes
                want = {k: (tuple(v.shape), v.dtype) for k, v in klass(**spec["config"]).own_state_dict().items()}
            got = {k: (tuple(v.shape), v.dtype) for k, v in own.items()}
            if got != want:
                bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
                raise malformed(f"module at {path!r} ({spec['module']}) has tensors that do not fit its config: "
                                 f"{bad} (want {[want.get(k) for k in bad]}, file {[got.get(k) for k in bad]})")
            m = klass(**spec["config"])
            m.load_state_dict(own, strict=True)
            modules[path] = m
        if sum(len(m.own_state_dict()) for m in modules.values()) != len(tensors):
            raise malformed("some tensors belong to no module")
        return cls(modules, meta)

    def _describe_body(self) -> list[str]:
        out = []
        for path, m in self.modules.items():
            n = sum(t.numel() for t in m.own_state_dict().values())
            out.append(f"  {type(m).__name__} at {path} ({n:,} own parameters)")
        return out
