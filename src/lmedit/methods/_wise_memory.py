"""WISE's side memories at one FFN output projection, and the edit kind that fills them (see ``wise.py``).

One :class:`WiseLayer` per (model, module path) wraps the projection W (the *main memory*); it is installed
when the first :class:`WiseEdit` there is applied and removed, giving back the original module object, when
the last is reverted. A side memory is W + τ, kept as the difference τ [d_out, d_in] from the main memory.

Every edit belongs to one *shard*: a group of at most ``shard_size`` consecutive edits trained on the same
random mask of W's entries (knowledge sharding). An edit owns its trained values on its shard's mask; a shard's
τ is the sum of its applied edits' values. Full shards are merged in groups of ``merge_every`` by TIES
(trim to ``density``, elect the sign, disjoint mean), so the layer holds: one side memory per merged group,
one per full shard not yet merged, and the open shard's.

Routing, at every token position: Δ_m = ‖σ(W x + τ_m x) − σ(W x)‖ for each side memory m (σ: the model's
activation function); the position takes the output of the memory with the largest Δ_m among those with
Δ_m ≥ θ_m, else the main memory's. θ_m = act_ratio × the smallest in-scope Δ its edits recorded when trained,
leaving out an edit that a later edit of its shard replayed (that later edit re-measured it on the shared τ).

Everything the layer computes is a function of the set of applied edits and their apply order (recomputed on
every change), so reverting any edit -- from the open shard, a full shard, or a merged group (whose TIES merge
is then recomputed from its shards' remaining edits) -- leaves the layer exactly as if the edit had never been
applied. Edits trained after it on the same shard keep the values they learned with it present.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..edits import Edit, EditError, EditMismatchError
from ..hooks import get_module, set_module
from ._memory import ProjectionWrapper, remove_from

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """σ of the routing score: the model's activation function by its config name (identity if unknown)."""
    from transformers.activations import ACT2FN

    return ACT2FN[name] if name in ACT2FN else (lambda t: t)


def shard_mask(seed: int, shape: tuple[int, int], ratio: float) -> torch.Tensor:
    """Flat indices (int64, ascending) of the entries a shard trains: each entry with probability ``ratio``,
    drawn by a CPU generator seeded with ``seed`` (so a saved edit finds its mask again)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.nonzero(torch.rand(shape[0] * shape[1], generator=gen) < ratio).flatten()


def ties_merge(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al., 2023) of task vectors: keep each vector's top ``density`` fraction of
    entries by magnitude, elect each entry's sign by the sum of the kept values, average the kept values that
    agree with it (the disjoint mean)."""
    kept = []
    for tau in taus:
        flat = tau.flatten()
        k = max(1, int(round(density * flat.numel())))
        cut = flat.abs().kthvalue(flat.numel() - k + 1).values
        kept.append(torch.where(flat.abs() >= cut, flat, torch.zeros_like(flat)))
    stack = torch.stack(kept)  # [n, entries]
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    total = (stack * agree).sum(0)
    count = agree.sum(0).clamp_min(1)
    return (total / count).view_as(taus[0])


@dataclass(frozen=True)
class Sharding:
    """How the layer groups and merges edits; recorded in each edit (all edits at a layer must agree)."""

    shard_size: int
    merge_every: int
    density: float
    act_ratio: float
    mask_ratio: float
    seed: int
    norm_constraint: float

    def mask_seed(self, shard: int) -> int:
        return self.seed * 1_000_003 + shard


@dataclass
class Entry:
    """One edit's part of a side memory: its shard, its values on the shard's mask and its in-scope Δ."""

    shard: int
    values: torch.Tensor  # float32 [mask size]
    act: float
    sharding: Sharding
    replay: tuple[str, str] | None = None  # (prompt, answer) the shard's later edits train again
    replayed: int = 0  # how many of the shard's earlier edits (those with a replay) it trained again


class WiseLayer(ProjectionWrapper):
    """Wraps ``base`` (the main memory); holds the side memories of every applied WISE edit there."""

    def __init__(self, base: nn.Module, act: Callable[[torch.Tensor], torch.Tensor],
                 shape: tuple[int, int]) -> None:
        super().__init__(base)
        self.act = act
        self.shape = shape
        self._masks: dict[tuple[int, float], torch.Tensor] = {}
        self._memories: list[tuple[torch.Tensor, float]] = []  # (τ [d_out, d_in], θ)

    def mask(self, sharding: Sharding, shard: int) -> torch.Tensor:
        key = (sharding.mask_seed(shard), sharding.mask_ratio)
        if key not in self._masks:
            self._masks[key] = shard_mask(key[0], self.shape, key[1])
        return self._masks[key]

    def add(self, entry: Entry) -> int:
        for e in self._owned.values():
            if e.sharding != entry.sharding:
                raise EditMismatchError(
                    f"this WISE edit was made with sharding settings {entry.sharding}, but the side memory here "
                    f"holds edits made with {e.sharding}; revert those or compute the edit with their settings")
        if entry.values.numel() != self.mask(entry.sharding, entry.shard).numel():
            raise EditMismatchError("this WISE edit's values do not fit its shard's mask; recompute the edit")
        return super().add(entry)

    # --- the state, as a function of the applied set ----------------------------------------------
    def shards(self) -> dict[int, list[Entry]]:
        """Shard index -> its applied entries, in apply order."""
        out: dict[int, list[Entry]] = {}
        for e in self._owned.values():
            out.setdefault(e.shard, []).append(e)
        return dict(sorted(out.items()))

    def shard_tau(self, shard: int) -> torch.Tensor:
        """τ of one shard: the sum of its applied edits' values on its mask (zeros if it has none)."""
        tau = torch.zeros(self.shape[0] * self.shape[1])
        for e in self.shards().get(shard, []):
            tau.index_add_(0, self.mask(e.sharding, shard), e.values)
        return tau.view(self.shape)

    def replay_rows(self, shard: int) -> list[tuple[str, str]]:
        """(prompt, answer) of the shard's applied edits that carry one, in apply order."""
        return [e.replay for e in self.shards().get(shard, []) if e.replay is not None]

    def shard_floor(self, shard: int, replaying: int = 0) -> float:
        """The shard's routing statistic (inf if it has no edits): its threshold is act_ratio × this.

        It is the smallest statistic of the shard's edits that no later edit of the shard has replayed: a later
        edit that trained an earlier one's prompt again measured its Δ there on the τ they now share, so its
        statistic covers the earlier edit, whose own statistic was measured on an older τ. With ``replaying``
        > 0: the statistic the shard will have besides a new edit replaying that many of its newest edits."""
        entries = self.shards().get(shard, [])
        covered: set[int] = set()
        for j, e in enumerate([*entries, Entry(shard, torch.empty(0), float("inf"), entries[0].sharding,
                                               None, replaying)] if entries and replaying else entries):
            with_replay = [i for i in range(j) if entries[i].replay is not None]
            covered.update(with_replay[max(0, len(with_replay) - e.replayed):] if e.replayed else [])
        return min((e.act for i, e in enumerate(entries) if i not in covered), default=float("inf"))

    def open_shard(self) -> int | None:
        """The newest shard if it still has room for an edit, else None."""
        shards = self.shards()
        if not shards:
            return None
        last = max(shards)
        return last if len(shards[last]) < shards[last][0].sharding.shard_size else None

    def next_shard(self) -> int:
        shards = self.shards()
        return max(shards) + 1 if shards else 0

    def groups(self) -> list[tuple[list[int], bool]]:
        """Shard indices grouped by merge group, each with whether the group is merged: a group is merged once
        all its shards exist and its last is full (or a later shard exists, which starts only when it was)."""
        shards = self.shards()
        if not shards:
            return []
        sharding = next(iter(self._owned.values())).sharding
        k, last = sharding.merge_every, max(shards)
        by_group: dict[int, list[int]] = {}
        for s in shards:
            by_group.setdefault(s // k, []).append(s)
        out = []
        for g, members in sorted(by_group.items()):
            top = (g + 1) * k - 1
            done = k > 1 and len(members) == k and (
                last > top or len(shards[top]) >= sharding.shard_size)
            out.append((members, done))
        return out

    def _compile(self) -> None:
        self._memories = []
        shards = self.shards()
        if not shards:
            return
        sharding = next(iter(self._owned.values())).sharding
        for members, merged in self.groups():
            theta = [self.shard_floor(s) * sharding.act_ratio for s in members]
            taus = [self.shard_tau(s) for s in members]
            if merged:
                self._memories.append((ties_merge(taus, sharding.density), min(theta)))
            else:
                self._memories.extend(zip(taus, theta, strict=True))

    def memories(self) -> list[tuple[torch.Tensor, float]]:
        """The side memories in force: (τ [d_out, d_in], threshold θ) each."""
        return list(self._memories)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if not self._memories:
            return out
        return self.route(x, out)[0].to(out.dtype)

    def deltas(self, x: torch.Tensor, out: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """For each side memory in force: its output W x + τ x (float32), the routing score
        Δ = ‖σ(W x + τ x) − σ(W x)‖ per position, and its threshold θ (``out``: the main memory's W x)."""
        q, main = x.float(), out.float()
        if self._memories and self._memories[0][0].device != q.device:
            self._memories = [(t.to(q.device), th) for t, th in self._memories]
        main_act = self.act(main)
        for tau, theta in self._memories:
            side = main + F.linear(q, tau)
            yield side, (self.act(side) - main_act).norm(dim=-1), theta

    def route(self, x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed output (float32) for input ``x`` and main-memory output ``out``, and per position the
        index into :meth:`memories` of the side memory used (-1: the main memory)."""
        main = out.float()
        new, best = main, torch.full(main.shape[:-1], -1.0, device=x.device)
        choice = torch.full(main.shape[:-1], -1, dtype=torch.long, device=x.device)
        for i, (side, delta, theta) in enumerate(self.deltas(x, out)):
            fire = (delta >= theta) & (delta > best)
            new = torch.where(fire.unsqueeze(-1), side, new)
            best = torch.where(fire, delta, best)
            choice = torch.where(fire, torch.full_like(choice, i), choice)
        return new, choice


class WiseEdit(Edit):
    """One WISE edit: values on its shard's mask of the side memory at ``path``; order-free to revert.

    Attributes:
        path: the module path of the FFN output projection.
        shard: the shard it was trained in.
        values: float32 [mask size], its trained change of the side memory on the shard's mask.
        act: the smallest in-scope routing score Δ it reached when trained (its threshold statistic).
        sharding: the :class:`Sharding` settings it was made with.
        shape: (d_out, d_in) of the projection.
        activation: name of the model's activation function (σ of the routing score).
        replay: (prompt, answer) of the edit, trained again by the later edits of its shard (None: never).
        replayed: how many earlier edits of its shard it trained again (its statistic covers them).
    """

    kind = "wise_side_memory"
    order_free: ClassVar[bool] = True

    def __init__(self, path: str, shard: int, values: torch.Tensor, act: float, sharding: Sharding,
                 shape: tuple[int, int], activation: str, meta: dict[str, Any] | None = None,
                 replay: tuple[str, str] | None = None, replayed: int = 0) -> None:
        super().__init__(meta)
        if values.dim() != 1 or not torch.isfinite(values).all() or not act == act:
            raise EditError("refusing WISE edit: its values are not a finite vector (NaN/inf in training?)")
        self.path, self.shard, self.values, self.act = path, int(shard), values.float(), float(act)
        self.sharding, self.shape, self.activation = sharding, (int(shape[0]), int(shape[1])), activation
        self.replay = (str(replay[0]), str(replay[1])) if replay is not None else None
        self.replayed = int(replayed)

    def _apply(self, handle: ModelHandle, strict: bool, max_relative_update: float | None
               ) -> tuple[WiseLayer, int]:
        try:
            module = get_module(handle.model, self.path)
        except LookupError as err:
            raise EditMismatchError(f"this WISE edit is for module {self.path!r}, which {handle.name!r} does "
                                    "not have; load the model it was made for") from err
        base = module.base if isinstance(module, WiseLayer) else module
        w = handle.adapter.weight_out_in(base)
        if tuple(w.shape) != self.shape:
            raise EditMismatchError(f"this WISE edit is for a {self.shape[1]} -> {self.shape[0]} projection at "
                                    f"{self.path}; that module maps {w.shape[1]} -> {w.shape[0]}")
        if not isinstance(module, WiseLayer):
            module = WiseLayer(module, activation_fn(self.activation), self.shape)
            module.add(self._entry())  # checks before the model changes
            set_module(handle.model, self.path, module)
            return module, 0
        return module, module.add(self._entry())

    def _entry(self) -> Entry:
        return Entry(self.shard, self.values, self.act, self.sharding, self.replay, self.replayed)

    def _revert(self, handle: ModelHandle, done: tuple[WiseLayer, int]) -> None:
        remove_from(handle, self.path, *done)

    def _to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        body = {"path": self.path, "shard": self.shard, "act": self.act, "shape": list(self.shape),
                "activation": self.activation, "sharding": dict(self.sharding.__dict__),
                "replay": list(self.replay) if self.replay is not None else None, "replayed": self.replayed}
        return {"values": self.values}, body

    @classmethod
    def _from_state(cls, meta: dict, body: dict, tensors: dict[str, torch.Tensor]) -> WiseEdit:
        sharding = Sharding(**body["sharding"])
        shape = (int(body["shape"][0]), int(body["shape"][1]))
        values = tensors["values"].float()
        want = shard_mask(sharding.mask_seed(int(body["shard"])), shape, sharding.mask_ratio).numel()
        if values.numel() != want:
            raise EditError(f"saved WISE edit has {values.numel()} values, its shard's mask {want} entries")
        return cls(str(body["path"]), int(body["shard"]), values, float(body["act"]), sharding, shape,
                   str(body["activation"]), meta, body.get("replay"), int(body.get("replayed", 0)))

    def _describe_body(self) -> list[str]:
        return [f"  shard {self.shard} of the side memory at {self.path}: {self.values.numel()} trained entries "
                f"(mask ratio {self.sharding.mask_ratio}), in-scope Δ {self.act:.3g}"]
