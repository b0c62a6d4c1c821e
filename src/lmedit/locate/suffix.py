"""The forward passes of a value optimisation, made cheap (see :mod:`lmedit.locate.values`).

Only δ changes between steps, so the layers below the edit layer ℓ run once and are then replayed; the
positions before the subject's last token never change, so they run once and each step feeds only the rows'
suffixes on a copy of their key/value cache (:class:`Suffix`); logits are computed at the loss positions only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch

from ..hooks import get_module, replayed
from ..kv import body_and_head, cache_kwarg, new_cache
from ..metrics.scoring import logits_at
from .rows import Problem

log = logging.getLogger(__name__)


def replaying(handle, layer: int, output: object):
    """Layers 0..layer-1 replay the cached input of ``layer`` (the output of layer-1); restored on exit."""
    return replayed(handle.model, {handle.adapter.layer(i): output for i in range(layer)})


def loss_logits(handle, p: Problem) -> torch.Tensor:
    """Logits [n_positions, vocab] (float32) at the loss positions only."""
    inputs = dict(input_ids=p.ids, attention_mask=p.mask, position_ids=(p.mask.cumsum(-1) - 1).clamp(min=0),
                  use_cache=False)
    inputs = {k: (v.to(handle.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    return logits_at(handle, inputs, p.rows, p.cols).float()


class Suffix:
    """Rows split at the subject's last token: positions before it never change (δ is added there, at layer
    ℓ), so the prefixes run once, clean, and every step runs only the suffixes on a copy of their key/value
    cache. The suffixes' layers below ℓ do not change either: after ``record_below`` they are replayed.
    Logits come from the loss positions only."""

    def __init__(self, handle, p: Problem, layer: int) -> None:
        self.handle, self.layer, self.below = handle, layer, None
        model = handle.model
        self.body, self.head = body_and_head(model)  # not None: _suffix_forward checked
        split = p.index.tolist()
        pre = [s[:i] for s, i in zip(p.seqs, split, strict=True)]
        self.ids, suf_mask = handle.tokens.pad([s[i:] for s, i in zip(p.seqs, split, strict=True)], "right")
        self._loss_positions(p)
        self.positions = torch.tensor(split)[:, None] + torch.arange(self.ids.shape[1])[None]  # [rows, S]
        self.index = torch.zeros(len(split), dtype=torch.long)
        self.cache, self.mask = None, suf_mask
        self.cache_kw = cache_kwarg(self.body)
        if max(split) > 0:
            pre_ids, pre_mask = handle.tokens.pad(pre, "right")  # padded columns are masked out below
            self.cache = new_cache(model)
            with torch.no_grad():
                self.body(**self._dev(input_ids=pre_ids, attention_mask=pre_mask,
                                      position_ids=(pre_mask.cumsum(-1) - 1).clamp(min=0)),
                          use_cache=True, **{self.cache_kw: self.cache})
            self.mask = torch.cat([pre_mask, suf_mask], 1)  # [rows, P + S]

    def _loss_positions(self, p: Problem) -> None:
        split = p.index.tolist()
        self.rows, self.cols = p.rows, [c - split[r] for r, c in zip(p.rows, p.cols, strict=True)]

    def _dev(self, **kw: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.to(self.handle.device) for k, v in kw.items()}

    def logits(self) -> torch.Tensor:
        extra = {self.cache_kw: copy.deepcopy(self.cache), "use_cache": True} if self.cache is not None else {}
        replay = replaying(self.handle, self.layer, self.below) if self.below is not None \
            else contextlib.nullcontext()
        with replay:
            hidden = self.body(**self._dev(input_ids=self.ids, attention_mask=self.mask,
                                           position_ids=self.positions), **extra).last_hidden_state  # [rows, S, d]
        return self.head(hidden[self.rows, self.cols]).float()  # [n_positions, vocab]

    def record_below(self) -> torch.Tensor:
        """One pass at the current δ (added at ℓ, above what it records) that keeps the output of layer ℓ-1;
        its logits carry the graph to δ when grad is enabled."""
        logits, self.below = with_input_of(self.handle, self.layer, self.logits)
        return logits

    def select(self, keep: torch.Tensor, p: Problem) -> None:
        """Keep only the rows ``keep`` (in that order), which are the rows of ``p``: requests whose
        optimisation has stopped leave the batch."""
        self.ids, self.mask, self.positions = self.ids[keep], self.mask[keep], self.positions[keep]
        self.index = torch.zeros(len(keep), dtype=torch.long)
        if self.cache is not None:
            self.cache.batch_select_indices(keep.to(self.handle.device))
        if self.below is not None:
            adapter = self.handle.adapter
            self.below = adapter.with_hidden(self.below, adapter.hidden(self.below)[keep.to(self.handle.device)])
        self._loss_positions(p)


def clean_pass(handle, p: Problem, layer: int) -> tuple[torch.Tensor, object]:
    """The loss logits of the full rows (δ = 0); also captures the input of layer ℓ (the output of layer ℓ-1)."""
    return with_input_of(handle, layer, lambda: loss_logits(handle, p))


def with_input_of(handle, layer: int, forward) -> tuple[torch.Tensor, object]:
    """``forward()``'s result and what entered layer ``layer`` meanwhile (detached; None for layer 0)."""
    if layer == 0:
        return forward(), None
    got: dict[str, object] = {}
    hook = get_module(handle.model, handle.adapter.layer(layer - 1)).register_forward_hook(
        lambda m, a, out: got.setdefault("out", detach_hidden(handle.adapter, out)))
    try:
        return forward(), got["out"]
    finally:
        hook.remove()


def suffix_forward(handle, p: Problem, sites: Any, clean: torch.Tensor, layer: int
                   ) -> tuple[Suffix | None, torch.Tensor | None]:
    """The suffix-only forward (layers ≥ ``layer`` only) and the logits of its first pass (δ = 0, with the
    graph to δ when grad is enabled: a value optimisation's step 0) when that pass reproduces the ``clean``
    logits of the full rows (checked here, once); else (None, None)."""
    if body_and_head(handle.model) is None:
        return None, None
    sites.enabled = False  # the clean prefix pass carries no δ
    try:
        suffix = Suffix(handle, p, layer)
    except (RuntimeError, ValueError, TypeError) as e:  # a cache this family cannot share (recurrent layers)
        return _full_forwards(sites, p, f"the prefix key/value cache is unusable ({str(e)[:120]})")
    finally:
        sites.enabled = True
    sites.set_index(suffix.index)
    try:
        got = suffix.record_below()
    except (RuntimeError, ValueError, TypeError) as e:
        return _full_forwards(sites, p, f"the prefix key/value cache is unusable ({str(e)[:120]})")
    clean = clean.detach()
    tol = 1e-3 if handle.dtype == torch.float32 else 5e-2
    diff = float((got.detach() - clean).abs().max()) if got.shape == clean.shape else float("inf")
    if diff <= tol * max(1.0, float(clean.abs().max())):
        return suffix, got
    return _full_forwards(sites, p, f"prefix key/value cache changed the logits (max diff {diff:.3g})")


def _full_forwards(sites: Any, p: Problem, why: str) -> tuple[None, None]:
    log.warning("%s; using full forwards", why)
    sites.set_index(p.index)
    return None, None


def detach_hidden(adapter, out: object) -> object:
    return adapter.with_hidden(out, adapter.hidden(out).detach())
