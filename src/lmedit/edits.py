"""Edits are objects: computed by an editor, then applied, reverted, saved, loaded and described.

Three kinds cover every method:

- :class:`WeightDelta` -- parameter name -> additive update (dense, or low-rank factors). ROME, MEMIT, FT,
  KN, MEND ... Applying it keeps the original values so that ``revert`` is bit-exact.
- :class:`ModuleSwap` -- modules installed in place of others (SERAC/GRACE/CaliNet-style wrappers),
  removed cleanly on revert; only the new modules' own weights are saved.
- :class:`PromptContext` -- text put before every prompt (IKE); the model's weights never change.

A handle keeps the stack of edits applied to its model (``handle.applied_edits``, oldest first): ``apply``
pushes, ``revert`` pops, and reverting anything but the newest applied edit raises :class:`EditOrderError`
with nothing changed (undoing an edit under a later one would leave the later one's wrappers or deltas
computed against weights that are no longer there). The exception: edits whose removal commutes with every
other edit (``order_free``, e.g. one entry of a key-value memory) may be reverted from under later edits.
:func:`lmedit.undo.remove_edit` (``rebuild=True``) removes a weight edit from under later ones.

Saving and loading: see :mod:`lmedit.edit_format` (digests of every tensor and of the metadata, checked on
load). Nothing in a saved edit is imported or unpickled: a :class:`ModuleSwap` stores the *registered name*
of each module class (:func:`register_swap_module`), never a class path.

The benchmark runner and the CLI only ever call these methods: there are no method-name switches.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from . import edit_format
from .edit_format import META_FILE, TENSOR_FILE, malformed  # noqa: F401  (re-exported)
from .errors import (  # noqa: F401  (defined with the other typed errors; imported from here too)
    EditDivergedError,
    EditError,
    EditFileError,
    EditMismatchError,
    EditOrderError,
)
from .hooks import get_parameter

if TYPE_CHECKING:
    from .models.handle import ModelHandle

log = logging.getLogger(__name__)


MAX_RELATIVE_UPDATE = 100.0
"""Default bound on ‖ΔW‖/‖W‖ per parameter for :meth:`Edit.apply` (``max_relative_update=``): an update a
hundred times the size of the weights it changes. Real edits stay far below it (docs/reliability.md has
measured values); FT-M with ``lr=1e6`` reaches 1e7-1e8."""


def _check_bound(name: str, delta: torch.Tensor, base: torch.Tensor, bound: float | None) -> None:
    """Refuse ‖ΔW‖/‖W‖ > bound (a parameter whose values are all zero, e.g. a fresh bias, has no ratio)."""
    base_norm = float(base.norm())
    if bound is None or base_norm == 0:
        return
    rel = float(delta.to(torch.float32).norm()) / base_norm
    if rel > bound:
        raise EditDivergedError(
            f"refusing edit: ‖ΔW‖/‖W‖ of {name} is {rel:.3g}, above max_relative_update = {bound:g} (the "
            "optimisation diverged, e.g. a learning rate far too large); the model is unchanged. Lower the "
            "method's step size (its lr), or raise the bound if the update is intended "
            "(edit.apply(handle, max_relative_update=X))", option="max_relative_update")


_INT_VIEW = {4: torch.int32, 2: torch.int16}


def _undo_record(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor, before_digest: str
                 ) -> tuple[Any, ...]:
    """What a weight edit keeps to put ``before`` back bit-exactly, in a fraction of a copy's memory.

    ``after`` = round(before + Δ). Recomputing round(after − Δ) gives ``before`` back in most entries and a few
    units in the last place off in the rest, so the record holds those offsets of the bit patterns as int8
    (only the entries that differ, with their int32 indices, when they are under a fifth), the few entries
    whose offset does not fit in int8 (where |Δ| ≫ |W|) verbatim, a digest of ``after`` (the revert checks it
    undoes what it wrote) and one of ``before`` (it checks its result). Sequential weight edits would
    otherwise keep a full copy of every layer they touch per edit (AlphaEdit on SmolLM2: 17.7 MB each, so
    18 GB after 1,000 edits); this keeps about a tenth of that at ‖ΔW‖/‖W‖ = 0.1. Other dtypes keep a copy."""
    from .digests import tensor_digest

    ints = _INT_VIEW.get(before.element_size())
    if ints is None or not before.is_floating_point() or before.numel() == 0:
        return ("copy", before.clone())
    back = (after.to(torch.float32) - delta.to(torch.float32)).to(before.dtype)
    want = before.contiguous().view(ints).view(-1)
    offset = want.to(torch.int64) - back.contiguous().view(ints).view(-1).to(torch.int64)
    big = (offset.abs() > 127).nonzero().view(-1)
    offset[big] = 0
    exact = (big.to(torch.int32), want[big].clone())
    where = offset.nonzero().view(-1)
    if 5 * where.numel() < offset.numel():
        small: tuple[torch.Tensor, ...] = (where.to(torch.int32), offset[where].to(torch.int8))
    else:
        small = (offset.to(torch.int8),)
    return ("offsets", tensor_digest(after), before_digest, small, exact)


def _undone(current: torch.Tensor, record: tuple[Any, ...], delta: Any) -> torch.Tensor | str:
    """``before`` from an :func:`_undo_record` (``delta``: a callable giving Δ again), or why it cannot be
    restored bit-exactly (then nothing may be written)."""
    from .digests import tensor_digest

    if record[0] == "copy":
        return record[1]
    _, after_digest, before_digest, small, (big, big_bits) = record
    if tensor_digest(current) != after_digest:
        return "it no longer holds what this edit wrote (was it changed outside lmedit?)"
    ints = _INT_VIEW[current.element_size()]
    back = (current.to(torch.float32) - delta().to(torch.float32)).to(current.dtype)
    bits = back.contiguous().view(ints).view(-1).to(torch.int64)
    if len(small) == 2:
        bits[small[0].to(torch.int64)] += small[1].to(torch.int64)
    else:
        bits += small[0].to(torch.int64)
    bits[big.to(torch.int64)] = big_bits.to(torch.int64)
    before = bits.to(ints).view(current.dtype).view(current.shape)
    if tensor_digest(before) != before_digest:
        return ("recomputing the edit's update did not give back the weights before it bit for bit (another "
                "device or number type than when it was applied?)")
    return before


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
    # True when reverting this edit commutes with every other applied edit, so it may be undone from under
    # later edits (the memory editors' entries); see the module docstring
    order_free: ClassVar[bool] = False
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
    def _check_model(self, handle: ModelHandle) -> None:
        want = self.meta.get("model_fingerprint")
        if want and want != handle.fingerprint:
            raise EditMismatchError(
                f"this edit was computed for model {self.meta.get('model_name')!r} (fingerprint {want}), "
                f"not for {handle.name!r} (fingerprint {handle.fingerprint}); load the model it was made "
                "for, or recompute the edit on this one"
            )

    def is_applied(self, handle: ModelHandle) -> bool:
        """Whether this edit is currently applied to ``handle``'s model."""
        return id(handle.model) in self._applied_to

    def label(self) -> str:
        """A short name for messages: kind, method and first request."""
        reqs = self.meta.get("requests") or []
        first = reqs[0] if reqs and isinstance(reqs[0], dict) else {}
        what = f" {first.get('prompt')!r} -> {first.get('target_new')!r}" if first else ""
        more = f" (+{len(reqs) - 1} more)" if len(reqs) > 1 else ""
        return f"{type(self).__name__}[{self.meta.get('method', '?')}{what}{more}]"

    # --- interface ---------------------------------------------------------------------------------
    def apply(self, handle: ModelHandle, *, strict: bool = True,
              max_relative_update: float | None | str = "default") -> Edit:
        """Write the edit into ``handle``'s model. Raises and leaves the model untouched on any problem.

        Args:
            strict: refuse weights other than those the edit was computed on.
            max_relative_update: refuse (:class:`EditDivergedError`) a weight update whose ‖ΔW‖/‖W‖ exceeds
                this on any parameter (None: no bound; default: :data:`MAX_RELATIVE_UPDATE` when called).
        """
        if max_relative_update == "default":
            max_relative_update = MAX_RELATIVE_UPDATE
        if self.is_applied(handle):
            raise EditError("this edit is already applied to that model; revert it first")
        if max_relative_update is not None and not max_relative_update > 0:
            raise ValueError(f"max_relative_update must be a positive number or None, got {max_relative_update!r}")
        self._check_model(handle)
        self._applied_to[id(handle.model)] = self._apply(handle, strict, max_relative_update)
        handle._applied.append(self)
        return self

    def revert(self, handle: ModelHandle) -> None:
        """Undo :meth:`apply` exactly. Edits applied after this one must be reverted first
        (:class:`EditOrderError` otherwise, with nothing changed)."""
        if not self.is_applied(handle):
            raise EditError("this edit is not applied to that model; nothing to revert")
        stack = handle._applied
        later = stack[stack.index(self) + 1:] if self in stack else []
        if later and not self.order_free:
            raise EditOrderError(
                f"cannot revert {self.label()}: {len(later)} edit(s) applied after it are still applied; revert "
                f"them first, newest first: {', '.join(e.label() for e in reversed(later))} "
                "(handle.applied_edits lists the applied edits, oldest first); nothing was changed")
        self._revert(handle, self._applied_to[id(handle.model)])  # a revert that raises changed nothing
        del self._applied_to[id(handle.model)]
        if self in stack:
            stack.remove(self)

    @contextlib.contextmanager
    def applied(self, handle: ModelHandle, **apply_kw: Any) -> Iterator[Any]:
        """``with edit.applied(handle): ...`` -- applied inside the block, reverted after it."""
        self.apply(handle, **apply_kw)
        try:
            yield handle
        finally:
            self.revert(handle)

    def describe(self) -> str:
        """A few readable lines: the kind of edit, the method, the model and the requests it carries."""
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
        """Save to a directory: ``edit.json`` (metadata and digests) and ``tensors.safetensors`` (if any
        tensors); see :mod:`lmedit.edit_format`. Refuses a path that is a file, and an edit without
        ``meta["model_fingerprint"]`` (its loader could not check the model)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise EditError(f"cannot save the edit to {path}: it is a file; give a folder path (new or empty)")
        if not self.meta.get("model_fingerprint"):
            raise EditError("this edit has no meta['model_fingerprint'], so a loaded copy could not check its "
                            "model; set edit.meta['model_fingerprint'] = handle.fingerprint before saving")
        tensors, body = self._to_state()
        return edit_format.write(path, self.kind, self.meta, body, tensors)

    @staticmethod
    def load(path: str | Path) -> Edit:
        """Load an edit saved with :meth:`save`, after checking its digests, fields, tensor shapes and module
        names (:class:`EditFileError` otherwise); it still refuses models other than the one it was made for."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a saved edit (no {META_FILE}); save one with edit.save(path)")
        from . import swaps  # noqa: F401  (registers the module_swap kind)

        try:
            kind, meta, body, tensors = edit_format.read(path)
            cls = Edit._kinds.get(kind)
            if cls is None:  # kinds defined in method modules (the memory editors') register when those load
                from .registry import list_editors

                list_editors()
                cls = Edit._kinds.get(kind)
            if cls is None:
                raise edit_format.FormatProblem(f"has unknown kind {kind!r}; known: {sorted(Edit._kinds)}")
            return cls._from_state(meta, body, tensors)
        except edit_format.FormatProblem as e:
            raise EditFileError(f"saved edit at {path} {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # EditError included
            raise EditFileError(f"saved edit at {path} is malformed ({type(e).__name__}: {e}); "
                                f"{edit_format.RECOMPUTE}") from None

    # --- for subclasses ----------------------------------------------------------------------------
    def _apply(self, handle: ModelHandle, strict: bool, max_relative_update: float | None) -> Any:
        raise NotImplementedError

    def _revert(self, handle: ModelHandle, state: Any) -> None:
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
        """The full ΔW of parameter ``name`` (a low-rank pair ``(a, b)`` is multiplied out as ``a @ b.T``)."""
        d = self.deltas[name]
        if isinstance(d, tuple):
            a, b = d
            return a.float() @ b.float().T
        return d

    def _apply(self, handle: ModelHandle, strict: bool, max_relative_update: float | None) -> dict[str, torch.Tensor]:
        from .digests import tensor_digest

        model = handle.model
        new_values: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}
        for name in self.deltas:
            try:
                p = get_parameter(model, name)
            except LookupError:
                raise EditMismatchError(f"this edit updates parameter {name!r}, which {handle.name!r} does not "
                                        "have; apply it to the model it was computed for") from None
            delta = self.dense(name).to(p.device)
            if tuple(delta.shape) != tuple(p.shape):
                raise EditMismatchError(
                    f"update for {name} has shape {tuple(delta.shape)}, the parameter {tuple(p.shape)}")
            before_digest = tensor_digest(p)  # the strict check's and the undo record's
            if strict and name in self.base_digests and before_digest != self.base_digests[name]:
                raise EditMismatchError(
                    f"parameter {name} does not hold the values this edit was computed on (another edit is "
                    "applied, or another checkpoint); revert the other edits first or pass strict=False"
                )
            base = p.detach().to(torch.float32)
            new = (base + delta.to(torch.float32)).to(p.dtype)
            if not torch.isfinite(new).all():
                raise EditError(f"refusing edit: it would write NaN/inf into {name}; the model is unchanged")
            _check_bound(name, delta, base, max_relative_update)
            new_values[name] = new, delta, before_digest
        originals = {}
        with torch.no_grad():
            for name, (new, delta, before_digest) in new_values.items():
                p = get_parameter(model, name)
                originals[name] = _undo_record(p.detach(), new, delta, before_digest)
                p.copy_(new)
        return originals

    def _revert(self, handle: ModelHandle, originals: dict[str, Any]) -> None:
        restored: dict[str, torch.Tensor] = {}
        for name, record in originals.items():
            p = get_parameter(handle.model, name)
            before = _undone(p.detach(), record, lambda n=name, d=p.device: self.dense(n).to(d))
            if isinstance(before, str):
                raise EditError(f"cannot revert {self.label()} exactly: {name}: {before}; nothing was changed. "
                                "Reload the model to get the unedited weights")
            restored[name] = before
        with torch.no_grad():
            for name, before in restored.items():
                get_parameter(handle.model, name).copy_(before)

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
        layout, digests = body.get("layout"), body.get("base_digests", {})
        if not isinstance(layout, dict) or not layout:
            raise malformed("body.layout must map parameter names to 'dense' or 'low_rank'")
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            raise malformed("body.base_digests must map parameter names to digests")
        deltas: dict[str, Any] = {}
        for name, kind in layout.items():
            if kind == "low_rank":
                a, b = tensors.get(f"{name}::a"), tensors.get(f"{name}::b")
                if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
                    raise malformed(f"low-rank update of {name} needs factors a [rows, r] and b [cols, r]")
                deltas[name] = (a, b)
            elif kind == "dense" and name in tensors:
                deltas[name] = tensors[name]
            else:
                raise malformed(f"update of {name} has layout {kind!r} or no tensor")
        used = {k for n, kind in layout.items() for k in ([f"{n}::a", f"{n}::b"] if kind == "low_rank" else [n])}
        if set(tensors) != used:
            raise malformed(f"tensors {sorted(set(tensors) - used)} belong to no update")
        return cls(deltas, digests, meta)

    def norms(self) -> dict[str, float]:
        """The Frobenius norm ‖ΔW‖ of each edited parameter."""
        return {k: float(self.dense(k).float().norm()) for k in self.deltas}

    def _describe_body(self) -> list[str]:
        rel = self.meta.get("stats", {}).get("relative_norm", {})
        out = []
        for name, n in self.norms().items():
            extra = f", ‖ΔW‖/‖W‖ = {rel[name]:.4g}" if name in rel else ""
            out.append(f"  Δ {name}: ‖ΔW‖ = {n:.4g}{extra}")
        return out


class PromptContext(Edit):
    """Text placed before every prompt the model reads through its handle (in-context editing)."""

    kind = "prompt_context"

    def __init__(self, context: str, meta: dict[str, Any] | None = None) -> None:
        super().__init__(meta)
        self.context = context

    def _apply(self, handle: ModelHandle, strict: bool, max_relative_update: float | None) -> str:
        handle.contexts.append(self.context)
        return self.context

    def _revert(self, handle: ModelHandle, state: str) -> None:
        for i in range(len(handle.contexts) - 1, -1, -1):
            if handle.contexts[i] is state:
                del handle.contexts[i]
                return

    def _to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"context": self.context}

    @classmethod
    def _from_state(cls, meta: dict, body: dict, tensors: dict[str, torch.Tensor]) -> PromptContext:
        if not isinstance(body.get("context"), str) or tensors:
            raise malformed("body.context must be a string, and a prompt context has no tensors")
        return cls(body["context"], meta)

    def _describe_body(self) -> list[str]:
        return [f"  context of {len(self.context)} characters put before each prompt"]


_SWAPS = ("ModuleSwap", "SwapModule", "register_swap_module", "swap_module_class", "swap_module_name")


def __getattr__(name: str) -> Any:
    """``from lmedit.edits import ModuleSwap`` (and the swap-module registry) keeps working: they live in
    :mod:`lmedit.swaps`, imported on first use."""
    if name in _SWAPS:
        from . import swaps

        return getattr(swaps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
