"""A key–value memory at one module, shared by every memory edit there, and the edit kind that fills it.

One :class:`MemoryLayer` per (model, module path) wraps the module (an FFN output projection): it is
installed when the first :class:`MemoryEdit` there is applied and removed, giving back the original module
object, when the last is reverted. Each edit adds its own entries on apply and removes exactly those on
revert, in any order (``order_free``): what the layer computes is a function of the set of applied entries
and their apply order only, so deleting an older edit leaves the model equal to one that never had it.

Entries follow one of two rules, checked at every token position of every forward:

- ``"gate"`` (residual gate): cos(x, k) ≥ threshold → the entry's value is *added* to the module's output.
  Among several firing gates, the most similar key wins.
- ``"codebook"`` (deferral radius): the nearest codebook key within its radius (Euclidean) *replaces* the
  output. A key's radius is its own ε, shrunk to half its distance to every key of another label
  (the split rule; kept up to date on every change, equal to recomputing it from the applied set, so it
  never depends on history).

Collisions: an entry whose key equals an earlier applied entry's key of the same rule (relative distance
below ``COLLISION_TOLERANCE``: the same subject and prompt on the same weights), or, for an entry with
``same_fact`` set, whose key has cosine similarity ≥ ``same_fact`` with it (the same fact reworded),
*shadows* it: the newer edit wins while it is applied, and the older one comes back when the newer is
deleted.

Saved edits hold their keys and values as tensors (safetensors) and their per-entry numbers and labels as
JSON; no class path is read from a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from ..edits import Edit, EditError, EditMismatchError
from ..hooks import get_module, set_module
from .base import Capabilities

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)

Rule = Literal["gate", "codebook"]
RULES: tuple[str, ...] = ("gate", "codebook")
COLLISION_TOLERANCE = 1e-5  # ‖k_i − k_j‖ ≤ tol·max(‖k_i‖, ‖k_j‖): the same key


@dataclass
class Entries:
    """The entries one edit owns at one module: n keys [n, d_in] and values [n, d_out] (float32), the rule,
    one radius or threshold per entry and one label per entry (the codebook's split rule compares labels)."""

    rule: str
    keys: torch.Tensor
    values: torch.Tensor
    bounds: list[float]
    labels: list[str]
    same_fact: float | None = None  # cosine at or above which these keys shadow an earlier key (None: equal only)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise EditError(f"unknown memory rule {self.rule!r}; use one of {RULES}")
        if self.same_fact is not None and not 0 < self.same_fact <= 1:
            raise EditError(f"same_fact is a cosine similarity in (0, 1], got {self.same_fact}")
        n = self.keys.shape[0]
        if self.keys.dim() != 2 or self.values.dim() != 2 or self.values.shape[0] != n \
                or len(self.bounds) != n or len(self.labels) != n or n == 0:
            raise EditError(f"memory entries are inconsistent: keys {tuple(self.keys.shape)}, values "
                            f"{tuple(self.values.shape)}, {len(self.bounds)} bounds, {len(self.labels)} labels")
        for t in (self.keys, self.values):
            if not torch.isfinite(t).all():
                raise EditError("refusing edit: its memory keys or values hold NaN/inf")


class ProjectionWrapper(nn.Module):
    """Wraps a projection ``base`` (kept as ``self.base``) and holds what each applied edit added, by token in
    apply order; subclasses rebuild what they compute from that in ``_compile``. Nothing held is a
    parameter: the model's state dict gains only the ``base.`` prefix while installed."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self._owned: dict[int, Any] = {}  # token -> what the edit added, in apply order
        self._next = 0

    def __len__(self) -> int:
        return len(self._owned)

    # weight editors (ROME, MEMIT, ...) and the model adapter reach the wrapped projection's parameters under
    # their usual names ("...down_proj.weight"), so weight edits and memory edits combine at one layer
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def add(self, owned: Any) -> int:
        token = self._next
        self._next += 1
        self._owned[token] = owned
        self._compile()
        return token

    def remove(self, token: int) -> None:
        del self._owned[token]
        self._compile()

    def _compile(self) -> None:
        raise NotImplementedError


def remove_from(handle: ModelHandle, path: str, wrapper: ProjectionWrapper, token: int) -> None:
    """Take an edit's part out of the wrapper at ``path``; uninstall the wrapper when it holds nothing more."""
    if get_module(handle.model, path) is not wrapper:
        raise EditError(f"the memory at {path} was replaced by another edit's module; revert that edit first")
    wrapper.remove(token)
    if not len(wrapper):
        set_module(handle.model, path, wrapper.base)


class MemoryLayer(ProjectionWrapper):
    """Wraps ``base``; holds the entries of every applied memory edit at this module."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self._tables: dict[str, tuple[torch.Tensor, ...]] = {}
        self._active: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]] = {}  # = active()
        self._dirty = False

    def add(self, owned: Any) -> int:
        """Add an edit's entries: in O(n) when the state kept so far extends to exactly what :meth:`active`
        gives (one key; a codebook key that shadows nothing); otherwise everything is recomputed (O(n²))."""
        token = self._next
        self._next += 1
        self._owned[token] = owned
        if self._dirty or not self._extend(owned):
            self._compile()
        else:
            self._publish()
        return token

    def remove(self, token: int) -> None:
        """Take an edit's entries out; recomputed from the applied set at the next forward (reverting many
        edits in a row recomputes once)."""
        del self._owned[token]
        self._dirty, self._tables, self._active = True, {}, {}

    def active(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
        """Per rule: the keys, values, effective bounds and labels in force (collisions resolved)."""
        out = {}
        for rule in RULES:
            rows = [(e.keys[i], e.values[i], e.bounds[i], e.labels[i], e.same_fact)
                    for e in self._owned.values() if e.rule == rule for i in range(len(e.bounds))]
            if not rows:
                continue
            keys = torch.stack([r[0] for r in rows]).float()
            keep = _unshadowed(keys, [r[4] for r in rows])
            keys = keys[keep]
            values = torch.stack([rows[i][1] for i in keep.tolist()]).float()
            bounds = torch.tensor([rows[i][2] for i in keep.tolist()], dtype=torch.float32)
            labels = [rows[i][3] for i in keep.tolist()]
            if rule == "codebook":
                bounds = _split_radii(keys, bounds, labels)
            out[rule] = (keys, values, bounds, labels)
        return out

    def _compile(self) -> None:
        self._active, self._dirty = self.active(), False
        self._publish()

    def _publish(self) -> None:
        self._tables = {}
        for rule, (keys, values, bounds, _labels) in self._active.items():
            if rule == "gate":
                keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self._tables[rule] = (keys, values, bounds)

    def _extend(self, e: Entries) -> bool:
        """The state after adding ``e`` to what is applied, from the state before, when that is cheap and
        equal to recomputing; False (nothing changed) when the caller must recompute."""
        if len(e.bounds) != 1:
            return False
        k, v, bound = e.keys.float(), e.values.float(), torch.tensor(e.bounds, dtype=torch.float32)
        cur = self._active.get(e.rule)
        if cur is None:
            self._active[e.rule] = (k.clone(), v.clone(), bound, list(e.labels))
            return True
        keys, values, bounds, labels = cur
        shadowed = _collides(keys, k[0], e.same_fact)  # the older keys this one shadows
        if shadowed.any():
            if e.rule == "codebook":  # the others' split radii may grow: recompute
                return False
            keep = ~shadowed
            keys, values, bounds = keys[keep], values[keep], bounds[keep]
            labels = [x for x, gone in zip(labels, shadowed.tolist(), strict=True) if not gone]
        if e.rule == "codebook" and labels:
            other = torch.tensor([x != e.labels[0] for x in labels])
            half = torch.where(other, torch.cdist(keys, k)[:, 0] / 2, torch.full((len(labels),), float("inf")))
            bounds, bound = torch.minimum(bounds, half), torch.minimum(bound, half.min().reshape(1))
        self._active[e.rule] = (torch.cat([keys, k]), torch.cat([values, v]), torch.cat([bounds, bound]),
                                [*labels, e.labels[0]])
        return True

    def _table(self, rule: str, device: torch.device) -> tuple[torch.Tensor, ...]:
        t = self._tables[rule]
        if t[0].device != device:
            t = self._tables[rule] = tuple(x.to(device) for x in t)
        return t

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self._dirty:
            self._compile()
        if not self._tables:
            return out
        q = x.float()
        new = out.float()
        if "gate" in self._tables:
            keys, values, bounds = self._table("gate", q.device)
            sim = (q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ keys.T  # [..., n]
            best, idx = sim.max(dim=-1)
            fire = best >= bounds[idx]
            new = new + fire.unsqueeze(-1) * values[idx]
        if "codebook" in self._tables:
            keys, values, bounds = self._table("codebook", q.device)
            dist = torch.cdist(q.reshape(-1, q.shape[-1]), keys).reshape(*q.shape[:-1], -1)
            near, idx = dist.min(dim=-1)
            fire = (near <= bounds[idx]).unsqueeze(-1)
            new = torch.where(fire, values[idx], new)
        return new.to(out.dtype)


def _collides(keys: torch.Tensor, key: torch.Tensor, same_fact: float | None) -> torch.Tensor:
    """[n] bool: which of the older ``keys`` the newer ``key`` collides with (:func:`_unshadowed`'s rule)."""
    norms, norm = keys.norm(dim=-1), key.norm()
    same = (keys - key).norm(dim=-1) <= COLLISION_TOLERANCE * torch.maximum(norms, norm).clamp_min(1e-12)
    if same_fact is not None:
        same = same | ((keys / norms[:, None].clamp_min(1e-12)) @ (key / norm.clamp_min(1e-12)) >= same_fact)
    return same


def _unshadowed(keys: torch.Tensor, same_fact: list[float | None]) -> torch.Tensor:
    """Indices of the keys (in apply order) that no later key collides with."""
    norms = keys.norm(dim=-1)
    scale = torch.maximum(norms[:, None], norms[None, :]).clamp_min(1e-12)
    later = torch.triu(torch.ones(len(keys), len(keys), dtype=torch.bool), diagonal=1)  # [i, j]: j after i
    # matmul distances are off by up to ~3e-4 of the norms (an equal pair need not give 0): they only pick
    # candidates, and each candidate pair is measured directly, as _collides measures it
    same = (torch.cdist(keys, keys) <= 1e-2 * scale) & later
    for i, j in same.nonzero().tolist():
        same[i, j] = bool((keys[i] - keys[j]).norm() <= COLLISION_TOLERANCE * scale[i, j])
    if any(s is not None for s in same_fact):  # [i, j]: the later key j's own similarity bound
        bound = torch.tensor([2.0 if s is None else s for s in same_fact])
        unit = keys / norms[:, None].clamp_min(1e-12)
        same = same | (unit @ unit.T >= bound[None, :])
    return torch.nonzero(~(same & later).any(dim=1)).flatten()


def _split_radii(keys: torch.Tensor, radii: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """Each radius shrunk to half the distance to the nearest key of another label (GRACE's split rule)."""
    if len(labels) < 2:
        return radii
    dist = torch.cdist(keys, keys)
    codes = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
    lab = torch.tensor([codes[x] for x in labels])
    other = lab[:, None] != lab[None, :]
    half = torch.where(other, dist / 2, torch.full_like(dist, float("inf"))).min(dim=1).values
    return torch.minimum(radii, half)


class MemoryEdit(Edit):
    """Entries added to the shared :class:`MemoryLayer` at each module path; order-free to revert.

    Attributes:
        entries: module path -> :class:`Entries`.
    """

    kind = "memory_entries"
    order_free: ClassVar[bool] = True

    def __init__(self, entries: dict[str, Entries], meta: dict[str, Any] | None = None) -> None:
        super().__init__(meta)
        if not entries:
            raise EditError("a MemoryEdit needs entries at one module at least")
        self.entries = dict(entries)

    def _apply(self, handle: ModelHandle, strict: bool,
               max_relative_update: float | None) -> list[tuple[str, MemoryLayer, int]]:
        model = handle.model
        for path, e in self.entries.items():
            try:
                module = get_module(model, path)
            except LookupError as err:
                raise EditMismatchError(f"this memory edit is for module {path!r}, which {handle.name!r} does not "
                                        "have; load the model it was made for") from err
            base = module.base if isinstance(module, MemoryLayer) else module
            d_in, d_out = _widths(handle, base)
            if (e.keys.shape[1], e.values.shape[1]) != (d_in, d_out):
                raise EditMismatchError(
                    f"memory entries for {path} have keys of width {e.keys.shape[1]} and values of width "
                    f"{e.values.shape[1]}; that module maps {d_in} -> {d_out}")
        done: list[tuple[str, MemoryLayer, int]] = []
        for path, e in self.entries.items():
            module = get_module(model, path)
            if not isinstance(module, MemoryLayer):
                ref = next(module.parameters(), None)
                module = MemoryLayer(module)
                if ref is not None:
                    module.to(ref.device)
                set_module(model, path, module)
            done.append((path, module, module.add(e)))
        log.debug("memory edit applied: %s", {p: len(e.bounds) for p, e in self.entries.items()})
        return done

    def _revert(self, handle: ModelHandle, done: list[tuple[str, MemoryLayer, int]]) -> None:
        for path, memory, _token in done:
            if get_module(handle.model, path) is not memory:
                raise EditError(f"the memory at {path} was replaced by another edit's module; revert that edit "
                                "first")
        for path, memory, token in done:
            remove_from(handle, path, memory, token)

    def _to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        body: dict[str, Any] = {"modules": {}}
        for path, e in self.entries.items():
            tensors[f"{path}::keys"] = e.keys
            tensors[f"{path}::values"] = e.values
            body["modules"][path] = {"rule": e.rule, "bounds": list(e.bounds), "labels": list(e.labels)}
            if e.same_fact is not None:
                body["modules"][path]["same_fact"] = e.same_fact
        return tensors, body

    @classmethod
    def _from_state(cls, meta: dict, body: dict, tensors: dict[str, torch.Tensor]) -> MemoryEdit:
        entries = {}
        for path, spec in body["modules"].items():
            try:
                entries[path] = Entries(str(spec["rule"]), tensors[f"{path}::keys"].float(),
                                        tensors[f"{path}::values"].float(), [float(b) for b in spec["bounds"]],
                                        [str(x) for x in spec["labels"]], spec.get("same_fact"))
            except KeyError as err:
                raise EditError(f"saved memory edit is missing {err} for module {path}") from err
        return cls(entries, meta)

    def _describe_body(self) -> list[str]:
        return [f"  {len(e.bounds)} {e.rule} entr{'y' if len(e.bounds) == 1 else 'ies'} at {path} "
                f"(keys {e.keys.shape[1]}-d, values {e.values.shape[1]}-d)" for path, e in self.entries.items()]


def _widths(handle: ModelHandle, module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a projection, in the adapter's weight layout."""
    w = handle.adapter.weight_out_in(module)
    return int(w.shape[1]), int(w.shape[0])


def memory_at(handle: ModelHandle, path: str) -> MemoryLayer | None:
    """The memory installed at ``path``, if any."""
    module = get_module(handle.model, path)
    return module if isinstance(module, MemoryLayer) else None


def base_module(handle: ModelHandle, path: str) -> nn.Module:
    """The module at ``path`` without any memory around it."""
    module = get_module(handle.model, path)
    return module.base if isinstance(module, MemoryLayer) else module


# what the memory editors can do: facts in batches or one by one, stacked and deleted in any order; the
# keys are read from a decoder's FFN, so encoder-decoder models are out
MEMORY_CAPABILITIES = Capabilities(batch=True, sequential=True, edit_kind=MemoryEdit, encoder_decoder=False)
