"""Edits are objects: computed by an editor, then applied, reverted, saved, loaded and described.

Three kinds cover every method:

- :class:`WeightDelta` -- parameter name -> additive update (dense, or low-rank factors). ROME, MEMIT, FT,
  KN, MEND ... Applying it keeps the original values so that ``revert`` is bit-exact.
- :class:`ModuleSwap` -- modules installed in place of others (SERAC/GRACE/CaliNet-style wrappers),
  removed cleanly on revert; only the new modules' own weights are saved.
- :class:`PromptContext` -- text put before every prompt (IKE); the model's weights never change.

The benchmark runner and the CLI only ever call these methods: there are no method-name switches.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .hooks import get_module, get_parameter, set_module

log = logging.getLogger(__name__)

META_FILE = "edit.json"
TENSOR_FILE = "tensors.safetensors"


class EditError(RuntimeError):
    """An edit that cannot be applied or reverted as asked; the model is left as it was."""


class EditMismatchError(EditError):
    """An edit made for other weights (another model, or other base values) than the ones given."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lmedit")
    except Exception:  # noqa: BLE001  (not installed: running from a checkout)
        return "0+unknown"


class Edit:
    """Base class of the three edit kinds.

    Attributes:
        meta: JSON-serialisable facts about the edit: method, config, requests, model fingerprint and name,
            compute time, lmedit version, and method-specific statistics (``meta["stats"]``).
    """

    kind: ClassVar[str] = ""
    _kinds: ClassVar[dict[str, type[Edit]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.kind:
            Edit._kinds[cls.kind] = cls

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self.meta: dict[str, Any] = dict(meta or {})
        self.meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.meta.setdefault("lmedit_version", _version())
        self._applied_to: dict[int, Any] = {}

    # --- identity checks ---------------------------------------------------------------------------
    def _check_model(self, handle: Any) -> None:
        want = self.meta.get("model_fingerprint")
        if want and want != handle.fingerprint:
            raise EditMismatchError(
                f"this edit was computed for model {self.meta.get('model_name')!r} (fingerprint {want}), "
                f"not for {handle.name!r} (fingerprint {handle.fingerprint}); load the model it was made "
                "for, or recompute the edit on this one"
            )

    def is_applied(self, handle: Any) -> bool:
        return id(handle.model) in self._applied_to

    # --- interface ---------------------------------------------------------------------------------
    def apply(self, handle: Any, *, strict: bool = True) -> Edit:
        """Write the edit into ``handle``'s model. Raises and leaves the model untouched on any problem."""
        if self.is_applied(handle):
            raise EditError("this edit is already applied to that model; revert it first")
        self._check_model(handle)
        self._applied_to[id(handle.model)] = self._apply(handle, strict)
        return self

    def revert(self, handle: Any) -> None:
        """Undo :meth:`apply` exactly. Edits applied after this one must be reverted first."""
        if not self.is_applied(handle):
            raise EditError("this edit is not applied to that model; nothing to revert")
        self._revert(handle, self._applied_to.pop(id(handle.model)))

    @contextlib.contextmanager
    def applied(self, handle: Any) -> Iterator[Any]:
        """``with edit.applied(handle): ...`` -- applied inside the block, reverted after it."""
        self.apply(handle)
        try:
            yield handle
        finally:
            self.revert(handle)

    def describe(self) -> str:
        reqs = self.meta.get("requests", [])
        lines = [f"{type(self).__name__} by {self.meta.get('method', '?')} for {self.meta.get('model_name', '?')} "
                 f"({len(reqs)} request{'s' if len(reqs) != 1 else ''})"]
        for r in reqs[:5]:
            lines.append(f"  {r.get('prompt')!r} -> {r.get('target_new')!r}")
        if len(reqs) > 5:
            lines.append(f"  ... and {len(reqs) - 5} more")
        lines.extend(self._describe_body())
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Save to a directory: ``edit.json`` (metadata) and ``tensors.safetensors`` (if any tensors)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, body = self._to_state()
        meta = {"kind": self.kind, "meta": self.meta, "body": body}
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path / TENSOR_FILE)
        (path / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return path

    @staticmethod
    def load(path: str | Path) -> Edit:
        """Load an edit saved with :meth:`save`; it still refuses models other than the one it was made for."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).exists():
            raise FileNotFoundError(f"{path} is not a saved edit (no {META_FILE}); save one with edit.save(path)")
        try:
            meta = json.loads((path / META_FILE).read_text())
            tensors = load_file(path / TENSOR_FILE) if (path / TENSOR_FILE).exists() else {}
        except Exception as e:  # noqa: BLE001  (corrupt files of any sort)
            raise EditError(f"saved edit at {path} is corrupted: {e}") from e
        cls = Edit._kinds.get(meta.get("kind"))
        if cls is None:  # edit kinds defined in method modules (the memory editors') register when those load
            from .registry import list_editors

            list_editors()
            cls = Edit._kinds.get(meta.get("kind"))
        if cls is None:
            raise EditError(f"saved edit at {path} has unknown kind {meta.get('kind')!r}")
        return cls._from_state(meta["meta"], meta.get("body", {}), tensors)

    # --- for subclasses ----------------------------------------------------------------------------
    def _apply(self, handle: Any, strict: bool) -> Any:
        raise NotImplementedError

    def _revert(self, handle: Any, state: Any) -> None:
        raise NotImplementedError

    def _to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def _from_state(cls, meta: dict, body: dict, tensors: dict[str, torch.Tensor]) -> Edit:
        raise NotImplementedError

    def _describe_body(self) -> list[str]:
        return []


class WeightDelta(Edit):
    """Additive parameter updates. Each entry is a dense tensor in the parameter's own layout, or a pair
    ``(a, b)`` with ΔW = a @ bᵀ (low rank; a: [rows, r], b: [cols, r]).

    ``base_digests`` (param name -> content hash) ties the delta to the exact weights it was computed on:
    applying it to other values is refused unless ``strict=False``.
    """

    kind = "weight_delta"

    def __init__(self, deltas: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
                 base_digests: dict[str, str] | None = None, meta: dict[str, Any] | None = None) -> None:
        super().__init__(meta)
        if not deltas:
            raise EditError("a WeightDelta needs at least one parameter update")
        self.deltas = {k: (tuple(v) if isinstance(v, tuple | list) else v) for k, v in deltas.items()}
        self.base_digests = dict(base_digests or {})

    def dense(self, name: str) -> torch.Tensor:
        d = self.deltas[name]
        if isinstance(d, tuple):
            a, b = d
            return a.float() @ b.float().T
        return d

    def _apply(self, handle: Any, strict: bool) -> dict[str, torch.Tensor]:
        from .digests import tensor_digest

        model = handle.model
        new_values: dict[str, torch.Tensor] = {}
        for name in self.deltas:
            p = get_parameter(model, name)
            delta = self.dense(name).to(p.device)
            if tuple(delta.shape) != tuple(p.shape):
                raise EditMismatchError(f"update for {name} has shape {tuple(delta.shape)}, the parameter {tuple(p.shape)}")
            if strict and name in self.base_digests and tensor_digest(p) != self.base_digests[name]:
                raise EditMismatchError(
                    f"parameter {name} does not hold the values this edit was computed on (another edit is "
                    "applied, or another checkpoint); revert the other edits first or pass strict=False"
                )
            new = (p.detach().to(torch.float32) + delta.to(torch.float32)).to(p.dtype)
            if not torch.isfinite(new).all():
                raise EditError(f"refusing edit: it would write NaN/inf into {name}; the model is unchanged")
            new_values[name] = new
        originals = {}
        with torch.no_grad():
            for name, new in new_values.items():
                p = get_parameter(model, name)
                originals[name] = p.detach().clone()
                p.copy_(new)
        return originals

    def _revert(self, handle: Any, originals: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, orig in originals.items():
                get_parameter(handle.model, name).copy_(orig)

    def _to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        layout = {}
        for name, d in self.deltas.items():
            if isinstance(d, tuple):
                tensors[f"{name}::a"], tensors[f"{name}::b"] = d
                layout[name] = "low_rank"
            else:
                tensors[name] = d
                layout[name] = "dense"
        return tensors, {"layout": layout, "base_digests": self.base_digests}

    @classmethod
    def _from_state(cls, meta: dict, body: dict, tensors: dict[str, torch.Tensor]) -> WeightDelta:
        deltas: dict[str, Any] = {}
        for name, kind in body["layout"].items():
            deltas[name] = (tensors[f"{name}::a"], tensors[f"{name}::b"]) if kind == "low_rank" else tensors[name]
        return cls(deltas, body.get("base_digests"), meta)

    def norms(self) -> dict[str, float]:
        return {k: float(self.dense(k).float().norm()) for k in self.deltas}

    def _describe_body(self) -> list[str]:
        rel = self.meta.get("stats", {}).get("relative_norm", {})
        out = []
        for name, n in self.norms().items():
            extra = f", ‖ΔW‖/‖W‖ = {rel[name]:.4g}" if name in rel else ""
            out.append(f"  Δ {name}: ‖ΔW‖ = {n:.4g}{extra}")
        return out


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
        return {}

    def bind(self, handle: Any) -> None:
        """Called by :meth:`ModuleSwap.apply` before installing: modules that need the handle (its tokenizer,
        adapter or caches) at run time take it here; it is never saved."""

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}


class ModuleSwap(Edit):
    """Modules installed at given paths, each wrapping the module it replaces."""

    kind = "module_swap"

    def __init__(self, modules: dict[str, SwapModule], meta: dict[str, Any] | None = None) -> None:
        super().__init__(meta)
        if not modules:
            raise EditError("a ModuleSwap needs at least one module")
        self.modules = dict(modules)

    def _apply(self, handle: Any, strict: bool) -> list[tuple[str, nn.Module]]:
        for path, m in self.modules.items():
            for name, p in m.own_state_dict().items():
                if p.is_floating_point() and not torch.isfinite(p).all():
                    raise EditError(f"refusing edit: module for {path} has NaN/inf in {name}")
        installed: list[tuple[str, nn.Module]] = []
        try:
            for path, m in self.modules.items():
                original = get_module(handle.model, path)
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

    def _revert(self, handle: Any, installed: list[tuple[str, nn.Module]]) -> None:
        for path, original in reversed(installed):
            set_module(handle.model, path, original)
            self.modules[path].base = None

    def _to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        body: dict[str, Any] = {"modules": {}}
        for path, m in self.modules.items():
            cls = type(m)
            body["modules"][path] = {"class": f"{cls.__module__}:{cls.__qualname__}", "config": m.get_config()}
            for name, t in m.own_state_dict().items():
                tensors[f"{path}::{name}"] = t
        return tensors, body

    @classmethod
    def _from_state(cls, meta: dict, body: dict, tensors: dict[str, torch.Tensor]) -> ModuleSwap:
        modules: dict[str, SwapModule] = {}
        for path, spec in body["modules"].items():
            mod_name, _, qual = spec["class"].partition(":")
            if not mod_name.startswith("lmedit."):
                raise EditError(f"refusing to import module class {spec['class']!r} from a saved edit")
            klass = importlib.import_module(mod_name)
            for part in qual.split("."):
                klass = getattr(klass, part)
            m = klass(**spec["config"])
            own = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{path}::")}
            m.load_state_dict(own, strict=False)
            modules[path] = m
        return cls(modules, meta)

    def _describe_body(self) -> list[str]:
        out = []
        for path, m in self.modules.items():
            n = sum(t.numel() for t in m.own_state_dict().values())
            out.append(f"  {type(m).__name__} at {path} ({n:,} own parameters)")
        return out


class PromptContext(Edit):
    """Text placed before every prompt the model reads through its handle (in-context editing)."""

    kind = "prompt_context"

    def __init__(self, context: str, meta: dict[str, Any] | None = None) -> None:
        super().__init__(meta)
        self.context = context

    def _apply(self, handle: Any, strict: bool) -> str:
        handle.contexts.append(self.context)
        return self.context

    def _revert(self, handle: Any, state: str) -> None:
        for i in range(len(handle.contexts) - 1, -1, -1):
            if handle.contexts[i] is state:
                del handle.contexts[i]
                return

    def _to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"context": self.context}

    @classmethod
    def _from_state(cls, meta: dict, body: dict, tensors: dict[str, torch.Tensor]) -> PromptContext:
        return cls(body["context"], meta)

    def _describe_body(self) -> list[str]:
        return [f"  context of {len(self.context)} characters put before each prompt"]
