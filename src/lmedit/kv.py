"""Key/value caches of shared prefixes: run the tokens that many rows share once, then only the rest.

Two places read many rows that begin alike: value optimisation (every rewriting prompt up to the subject's
last token, :mod:`lmedit.locate.values`) and scoring under an in-context edit (IKE's demonstrations in
front of every evaluation prompt, :mod:`lmedit.metrics.scoring`). Both build a Hugging Face ``DynamicCache``
for the prefix here and run each step or batch on a copy of it.

Cropping a cache is avoided on purpose: ``DynamicCache.crop`` changed meaning across transformers versions.

Scoring one edit reads the same context many times over (teacher-forced rows of every metric, then each
generation batch), each through its own :class:`SharedPrefix`; inside :func:`reusing_prefixes` they share
the caches they compute, keyed by the prefix's tokens, so each distinct prefix runs once per scoring.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from typing import Any

import torch


def new_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def cache_kwarg(body: Any) -> str:
    """The keyword under which ``body.forward`` takes a cache (``cache`` or ``past_key_values``)."""
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def has_logit_processing(model: Any) -> bool:
    """Models that post-process logits (Gemma-2 soft-capping, scaled heads) go through their own forward."""
    cfg = model.config
    return bool(getattr(cfg, "final_logit_softcapping", None)) or bool(getattr(cfg, "logit_scale", None))


def needs_whole_sequence(model: Any) -> bool:
    """Does a module of ``model`` (as edited now) read every forward's whole token sequence? A SERAC router
    routes each row by its text, so it must see the row's every token in each forward: such a model runs
    without key/value caches and shared prefixes. Modules say so with a true ``whole_sequence`` attribute."""
    return any(getattr(m, "whole_sequence", False) for m in model.modules())


def body_and_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder body, unembedding) of a decoder-only model whose logits are ``head(body(...))``, else None
    (encoder-decoders, models without an output embedding or with logit post-processing, and models that
    must read whole sequences, :func:`needs_whole_sequence`). Every path that computes logits at chosen
    positions only, or from a cached prefix, asks this first."""
    if getattr(model.config, "is_encoder_decoder", False) or has_logit_processing(model) \
            or needs_whole_sequence(model):
        return None
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None:
        return None
    verdict = model.__dict__.get("_lmedit_plain_head")
    if verdict is None:  # checked once per model (ModelHandle does it at load, before any hook is installed):
        # the structure never changes, only weights do
        verdict = _head_reproduces_logits(model, body, head)
        model.__dict__["_lmedit_plain_head"] = verdict
    return (body, head) if verdict else None


@torch.no_grad()
def _head_reproduces_logits(model: Any, body: Any, head: Any) -> bool:
    """Does ``head(body(x))`` give the model's logits? Not when a transform sits between them (BERT-style
    prediction heads) or the forward rescales the logits (e.g. Granite's ``logits_scaling``)."""
    device = next(model.parameters()).device
    ids = torch.tensor([[3, 4, 5, 6]], device=device) % int(head.weight.shape[0])
    try:
        full = model(input_ids=ids, use_cache=False).logits
        h = body(input_ids=ids, use_cache=False)[0]
        part = head(h)
    except (RuntimeError, TypeError, ValueError):
        return False
    return part.shape == full.shape and torch.allclose(part, full, rtol=1e-4, atol=1e-4)


_MEMO = "_lmedit_prefix_caches"
MEMO_SIZE = 8  # prefixes kept per block: scoring one edit meets two or three (its batches' shared lengths)


@contextlib.contextmanager
def reusing_prefixes(model: Any) -> Iterator[None]:
    """Within this block every :class:`SharedPrefix` of ``model`` serves the caches any of them computed for
    the same tokens. The weights must not change inside it (scoring only reads them); the caches are dropped
    at its end. Nested blocks share the outer one's."""
    if _MEMO in model.__dict__:
        yield
        return
    model.__dict__[_MEMO] = {}
    try:
        yield
    finally:
        model.__dict__.pop(_MEMO, None)


class SharedPrefix:
    """A token sequence whose key/value cache serves, repeated, any batch of rows that begin with (a prefix
    of) it. The cache of each shared length is computed once, on first use."""

    def __init__(self, model: Any, ids: list[int], device: torch.device) -> None:
        body_head = body_and_head(model)
        if body_head is None:
            raise ValueError("a shared prefix needs a decoder-only model with a plain output head")
        self.model = model
        self.body, self.head = body_head
        self.ids, self.device = list(ids), device
        self.kw = cache_kwarg(self.body)
        self._caches: dict[int, Any] = {}

    def shared_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_col: int) -> int:
        """How many leading tokens every (right-padded) row shares with the prefix, kept below ``first_col``
        (the first position whose logits are read must be computed, not cached)."""
        n = min(len(self.ids), input_ids.shape[1], first_col)
        ref = torch.tensor(self.ids[:n], device=input_ids.device)
        same = (input_ids[:, :n] == ref[None]) & attention_mask[:, :n].bool()
        return int(same.all(0).long().cumprod(0).sum())

    @torch.no_grad()
    def _cache(self, k: int) -> Any:
        if k not in self._caches:
            memo = self.model.__dict__.get(_MEMO)
            key = tuple(self.ids[:k])
            cache = memo.get(key) if memo is not None else None
            if cache is None:
                cache = new_cache(self.model)
                ids = torch.tensor([self.ids[:k]], device=self.device)
                self.body(input_ids=ids, attention_mask=torch.ones_like(ids),
                          position_ids=torch.arange(k, device=self.device)[None], use_cache=True,
                          **{self.kw: cache})
                if memo is not None:
                    if len(memo) >= MEMO_SIZE:
                        memo.pop(next(iter(memo)))  # the oldest
                    memo[key] = cache
            self._caches[k] = cache
        return self._caches[k]

    def batch_cache(self, k: int, rows: int) -> Any:
        """A fresh copy of the cache of the first ``k`` prefix tokens, repeated for ``rows`` rows."""
        cache = copy.deepcopy(self._cache(k))
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
        """Last hidden states [rows, seq - k, d] of right-padded rows whose first ``k`` tokens are the
        prefix's, running only their tokens after ``k`` on a copy of the prefix's cache."""
        rows = input_ids.shape[0]
        cache = self.batch_cache(k, rows)
        suffix_mask = attention_mask[:, k:]
        mask = torch.cat([torch.ones(rows, k, dtype=attention_mask.dtype, device=attention_mask.device),
                          suffix_mask], 1)
        positions = k + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.body(input_ids=input_ids[:, k:].to(self.device), attention_mask=mask.to(self.device),
                        position_ids=positions.to(self.device), use_cache=True, **{self.kw: cache})
        return out.last_hidden_state
