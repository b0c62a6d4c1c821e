"""Target values: the vector v* (ROME) / z (MEMIT) that makes the model say the new object.

ROME §3.1, eq. 4 (methods-spec B.0 steps 1-8): a vector δ is added at the subject's last token to the
output of an *edit site* at layer ℓ, in every rewriting prompt x_j + p, and optimised with Adam on

    L(δ) = mean_j [ -log P(o* | x_j + p) / |o*| ]                      (NLL, per target token)
         + kl_factor · KL( P₀(· | p') ‖ P_δ(· | p') )                  (p' = "{subject} is a", subject-last)
         + weight_decay · ‖δ‖ / ‖v₀‖²

with ‖δ‖ ≤ clamp · ‖v₀‖ after each step and an early stop when L < 0.05; v* = v₀ + δ, v₀ being the clean
site output at the subject's last token of the plain prompt. Sites: ``"mlp"`` (W_out output: ROME),
``"layer"`` (the residual stream after layer ℓ: MEMIT, EMMET, AlphaEdit) and ``"attn"`` (attention output
projection: PMET optimises it together with ``"mlp"``).

Speed: only δ changes between steps, so the layers below ℓ run once; afterwards they are replaced, inside
this function only, by modules that replay their cached output. Positions before the subject's last token
never change at all: they run once and every step feeds only the rows' suffixes, on a copy of the prefixes'
key/value cache. Logits are computed only at the positions that carry loss (target and KL positions): final
norm output at those positions times the unembedding. Several requests can be optimised in one batch of rows
(``optimize_values(..., batch_size=)``): their losses are independent, so each δ still gets exactly its own
gradient, Adam state and stopping step, and the larger matrix products make a value 1.5-1.7x cheaper on a
2-core CPU (``benchmarks/joint_values.py``). All optimisation variables and losses are float32
whatever the model dtype; ``matmuls="bf16"`` runs the steps' matrix products from bfloat16 copies of the weights
(:mod:`.lowp`) and confirms a value's stop on the model's own weights. The rows are built in :mod:`.rows`, the
cheap forward passes run in :mod:`.suffix`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import get_module
from ..types import EditRequest
from .lowp import low_precision
from .rows import Part, Problem, assemble, request_rows
from .steppers import make_stepper
from .suffix import Suffix, clean_pass, loss_logits, replaying
from .suffix import suffix_forward as _suffix_forward  # module-level name: tests swap it out
from .templates import TemplateGroups

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ValueOptions:
    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 1e-3
    clamp: float = 4.0
    kl_factor: float = 0.0625
    early_stop: float = 0.05
    confident_stop: bool = False  # PMET: ×0.1 NLL once the target is the argmax, stop when KL ≤ 0.01
    optimizer: str = "adam"  # a name of .steppers.OPTIMIZERS
    answer_end: str = ""  # text taught right after the new answer ("": the answer alone, as the papers)
    matmuls: str = "model"  # "bf16": the steps' matrix products in bfloat16 (.lowp), the stop confirmed in float32


@dataclass
class ValueResult:
    """v₀ and δ per site (float32 [d]); ``target(site)`` = v₀ + δ."""

    init: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)

    def target(self, site: str) -> torch.Tensor:
        return self.init[site] + self.delta[site]


def site_path(adapter, site: str, layer: int) -> str:
    paths = {"mlp": adapter.mlp_out, "layer": adapter.layers, "attn": adapter.attn_out}
    if site not in paths:
        raise ValueError(f"unknown edit site {site!r}; use one of {sorted(paths)}")
    return paths[site].format(layer)


class _Sites:
    """Forward hooks that add each request's δ at its rows' subject-last index, and record the clean values
    v₀ on the first pass. δ and v₀ are kept per request (0..n-1 of the batch); ``order`` lists the requests
    whose rows the current forward carries, in row order."""

    def __init__(self, handle, paths: dict[str, str], p: Problem) -> None:
        self.adapter = handle.adapter
        self.delta: dict[str, list[torch.Tensor]] = {}
        self.init: dict[str, list[torch.Tensor]] = {}
        self.enabled = True
        self.set_layout(list(range(p.n_requests)), p, p.index)
        self._first = p.start
        self._hooks = [get_module(handle.model, path).register_forward_hook(self._hook(site))
                       for site, path in paths.items()]

    def set_layout(self, order: list[int], p: Problem, index: torch.Tensor) -> None:
        self.order, self.index = list(order), index
        self.request = p.request  # [rows] position in ``order`` of each row's request

    def set_index(self, index: torch.Tensor) -> None:
        self.index = index

    def params(self, g: int) -> list[torch.Tensor]:
        return [d[g] for d in self.delta.values()]

    def _hook(self, site: str):
        def add(_m: nn.Module, _a: tuple, out: object) -> object:
            if not self.enabled:
                return None
            flat = self.adapter.hidden(out)
            h = self.adapter.per_token(flat, len(self.index))  # [rows, seq, d] (some FFNs flatten tokens)
            if self.index.device != h.device:
                self.index, self.request = self.index.to(h.device), self.request.to(h.device)
            at = (torch.arange(h.shape[0], device=h.device), self.index)
            if site not in self.init:  # v₀: clean value at each request's plain prompt (its "{}" row)
                # cloned: a view would keep the whole batch's hidden states alive (and saved)
                self.init[site] = [h[r, self.index[r]].detach().float().clone() for r in self._first]
                self.delta[site] = [torch.zeros_like(v, requires_grad=True) for v in self.init[site]]
            deltas = [self.delta[site][g] for g in self.order]
            d = deltas[0] if len(deltas) == 1 else torch.stack(deltas)[self.request]  # one request: broadcast
            h = h.index_put(at, h[at] + d.to(h.dtype))
            return self.adapter.with_hidden(out, h.view(flat.shape))

        return add

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def optimize_values(handle, requests: Sequence[EditRequest], layer: int, sites: Sequence[str],
                    groups: TemplateGroups, opts: ValueOptions, batch_size: int = 1,
                    done: Callable[[int, ValueResult], None] | None = None) -> list[ValueResult]:
    """v* per site for each request (see the module docstring for the loss), ``batch_size`` requests
    optimised together; ``done(i, value)`` is called as soon as request i's value is final.

    The requests' losses are independent (a request's δ enters only its own rows), so one forward over the
    rows of several requests and a backward of the sum of their losses give each δ exactly its own gradient;
    every request keeps its own Adam state, clamp and stopping step, and leaves the batch when it stops.
    Batching only changes floating-point rounding. Requests are grouped by suffix length, which keeps
    padding low. More than one batch shows a progress bar.
    """
    from tqdm.auto import tqdm

    size = max(1, batch_size)
    parts = [request_rows(handle, r, groups, opts.answer_end) for r in requests]
    order = sorted(range(len(parts)), key=lambda i: (parts[i].suffix_len, i))
    results: list[ValueResult | None] = [None] * len(parts)
    with tqdm(total=len(parts), desc="optimising target values", unit="value", disable=len(parts) <= size) as bar:
        for s in range(0, len(order), size):
            chunk = order[s : s + size]
            for i, res in zip(chunk, _optimize_together(handle, [parts[i] for i in chunk], layer, sites, opts),
                              strict=True):
                results[i] = res
                if done is not None:
                    done(i, res)
            bar.update(len(chunk))
    return results  # type: ignore[return-value]


def optimize_value(handle, request: EditRequest, layer: int, sites: Sequence[str], groups: TemplateGroups,
                   opts: ValueOptions) -> ValueResult:
    """v* per site for one request."""
    return optimize_values(handle, [request], layer, sites, groups, opts)[0]


def _optimize_together(handle, parts: Sequence[Part], layer: int, sites: Sequence[str],
                       opts: ValueOptions) -> list[ValueResult]:
    p = assemble(handle, parts)
    n = len(parts)
    sites_ = _Sites(handle, {s: site_path(handle.adapter, s, layer) for s in sites}, p)
    losses: list[list[float]] = [[] for _ in range(n)]
    running = set(range(n))
    try:
        with torch.no_grad():
            clean, below = clean_pass(handle, p, layer)  # records v₀ and creates δ = 0 (no graph: see below)
        kl_init = F.log_softmax(clean[len(p.labels):], -1)  # [n, vocab]
        with torch.enable_grad():
            # step 0's logits (with their graph) come from the suffix pass that checks the prefix cache, so
            # the full rows never run backward (once a backward through every row: about a step and a half)
            suffix, logits = _suffix_forward(handle, p, sites_, clean, layer)
            if suffix is None:  # the prefix cache did not reproduce the logits: replay the lower layers
                ctx = replaying(handle, layer, below) if layer > 0 else contextlib.nullcontext()
                forward = lambda: loss_logits(handle, p)  # noqa: E731
            else:
                ctx, forward = contextlib.nullcontext(), suffix.logits
            steppers = [make_stepper(opts.optimizer, sites_.params(g), opts.lr, _radii(sites_, g, opts.clamp))
                        for g in range(n)]
            # bf16 matrix products for the steps (suffix passes only); step 0's logits are the model's own
            lowp = low_precision(handle, layer, suffix.head, opts.matmuls) if suffix is not None else None
            confirm: set[int] = set()  # below the stop at bf16: the next pass reads them at model precision
            precise = True
            with ctx, lowp or contextlib.nullcontext():
                for step in range(opts.steps):
                    if step > 0 or logits is None:
                        precise = lowp is None or bool(confirm)
                        if lowp is not None:
                            lowp.enabled = not precise
                        logits = forward()
                    order = sites_.order
                    loss, confident = _losses(p, logits, kl_init[order], sites_, opts)  # [len(order)]
                    going, grad = [], []
                    for j, (g, value) in enumerate(zip(order, loss.tolist(), strict=True)):
                        if g not in running:
                            continue
                        if value < opts.early_stop or confident[j]:  # stop at this δ
                            if not precise and step < opts.steps - 1:
                                confirm.add(g)  # δ stays; stops if the model's own weights agree
                                continue
                            losses[g].append(value)
                            running.discard(g)
                            confirm.discard(g)
                            continue
                        confirm.discard(g)
                        wants_grad = steppers[g].evaluated(value)
                        losses[g].append(steppers[g].loss)  # the loss of the δ kept so far
                        if step == opts.steps - 1:
                            steppers[g].finish()
                            running.discard(g)
                            continue
                        going.append(j)
                        if wants_grad:
                            grad.append(j)
                    if not running:  # every request stopped (those left are stepping or awaiting a check)
                        break
                    for j in grad:
                        steppers[order[j]].zero_grad()
                    if grad:
                        loss[grad].sum().backward()
                    for j in going:
                        steppers[order[j]].step()
                        _clamp(sites_, order[j], opts.clamp)
                    keep = [g for g in order if g in running]
                    if suffix is not None and len(keep) < len(order):  # stopped requests leave the batch
                        p = _drop_stopped(handle, parts, p, suffix, sites_, keep)
    finally:
        sites_.close()
    for g in range(n):
        log.debug("value optimisation at layer %d: loss %s", layer, " ".join(f"{x:.3f}" for x in losses[g]))
    return [ValueResult({s: v[g] for s, v in sites_.init.items()},
                        {s: d[g].detach().clone() for s, d in sites_.delta.items()}, losses[g]) for g in range(n)]


def _drop_stopped(handle, parts: Sequence[Part], p: Problem, suffix: Suffix, sites: _Sites,
                  keep: list[int]) -> Problem:
    """The problem of the requests ``keep`` only, with the suffix forward and the hooks cut to their rows."""
    where = {g: j for j, g in enumerate(sites.order)}
    bounds = p.start + [len(p.seqs)]
    rows = torch.cat([torch.arange(bounds[where[g]], bounds[where[g] + 1]) for g in keep])
    new = assemble(handle, [parts[g] for g in keep])
    suffix.select(rows, new)
    sites.set_layout(keep, new, suffix.index)
    return new


def _losses(p: Problem, logits: torch.Tensor, kl_init: torch.Tensor, sites: _Sites,
            opts: ValueOptions) -> tuple[torch.Tensor, list[bool]]:
    """Per request of ``sites.order``: NLL (mean over its rewriting prompts of the per-token mean) + KL +
    weight decay; and PMET's stop flags."""
    n = p.n_requests
    logp = F.log_softmax(logits, -1)  # [n_positions, vocab]
    n_t = len(p.labels)
    tgt, klp = logp[:n_t], logp[n_t:]  # target positions, then one KL position per request
    labels, owner = p.labels.to(tgt.device), p.owner.to(tgt.device)
    request = p.request.to(tgt.device)
    token_nll = -tgt.gather(1, labels[:, None])[:, 0]  # [n_target_positions]
    rows = len(p.seqs)
    per_row = torch.zeros(rows, device=tgt.device).index_add(0, owner, token_nll)
    per_row = per_row / torch.bincount(owner, minlength=rows).clamp(min=1)  # KL rows: 0
    nll = torch.zeros(n, device=tgt.device).index_add(0, request, per_row) / p.n_rewrite.to(tgt.device)
    kl = opts.kl_factor * F.kl_div(klp, kl_init, log_target=True, reduction="none").sum(-1)  # [n]
    wd = torch.stack([sum(opts.weight_decay * sites.delta[s][g].norm() / sites.init[s][g].norm() ** 2
                          for s in sites.delta) for g in sites.order])
    confident = [False] * n
    if opts.confident_stop:
        miss = (tgt.argmax(-1) != labels).float()
        missed = torch.zeros(n, device=tgt.device).index_add(0, request[owner], miss).cpu()
        sure = missed == 0
        nll = torch.where(sure.to(nll.device), 0.1 * nll, nll)
        ratio = (kl.detach() / max(opts.kl_factor, 1e-12)).cpu()
        confident = [bool(a) and float(r) <= 0.01 for a, r in zip(sure, ratio, strict=True)]
    return nll + kl + wd, confident


def _radii(sites: _Sites, g: int, factor: float) -> list[float]:
    """The clamp radius factor · ‖v₀‖ of request ``g``'s δ, per site (in the order of ``sites.params``)."""
    return [factor * float(v[g].norm()) for v in sites.init.values()]


@torch.no_grad()
def _clamp(sites: _Sites, g: int, factor: float) -> None:
    """Project request ``g``'s δ onto the ball ‖δ‖ ≤ factor · ‖v₀‖, per site."""
    for s, deltas in sites.delta.items():
        d = deltas[g]
        limit = factor * sites.init[s][g].norm()
        n = d.norm()
        if n > limit:
            d.mul_(limit / n)
