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
key/value cache. Logits are computed only at the positions
that carry loss (target and KL positions): final norm output at those positions times the unembedding.
All optimisation variables and losses are float32 whatever the model dtype.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import get_module, replayed
from ..kv import body_and_head, cache_kwarg, new_cache
from ..metrics.scoring import logits_at
from ..types import EditRequest
from .keys import subject_last
from .templates import TemplateGroups, compose, flatten

log = logging.getLogger(__name__)

KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class ValueOptions:
    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 1e-3
    clamp: float = 4.0
    kl_factor: float = 0.0625
    early_stop: float = 0.05
    confident_stop: bool = False  # PMET: ×0.1 NLL once the target is the argmax, stop when KL ≤ 0.01


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


@dataclass
class _Problem:
    ids: torch.Tensor  # [rows, seq]
    mask: torch.Tensor  # [rows, seq]
    index: torch.Tensor  # [rows] subject-last index of each row (where δ is added)
    rows: list[int]  # (row, col) of every logit position that carries loss; the KL position is last
    cols: list[int]
    labels: torch.Tensor  # [n_target_positions]
    owner: torch.Tensor  # [n_target_positions] rewriting row of each target position
    n_rewrite: int
    seqs: list[list[int]]  # unpadded rows


def _problem(handle, request: EditRequest, groups: TemplateGroups) -> _Problem:
    """Rewriting prompts (every template, target appended, teacher forced) plus the KL prompt, right padded."""
    tokens = handle.tokens
    flat, _ = flatten(groups)
    seqs, index, rows, cols, labels, owner = [], [], [], [], [], []
    for r, ctx in enumerate(flat):
        template = compose(ctx, request.template)
        row = subject_last(tokens, template, request.subject)
        target = tokens.target_ids(template.format(request.subject), request.target_new)
        seqs.append(list(row.ids) + target[:-1])
        index.append(row.index)
        for j, y in enumerate(target):
            rows.append(r)
            cols.append(len(row.ids) - 1 + j)
            labels.append(y)
            owner.append(r)
    kl = subject_last(tokens, KL_TEMPLATE, request.subject)
    seqs.append(list(kl.ids))
    index.append(kl.index)
    rows.append(len(flat))
    cols.append(kl.index)
    ids, mask = tokens.pad(seqs, "right")
    return _Problem(ids, mask, torch.tensor(index), rows, cols, torch.tensor(labels), torch.tensor(owner),
                    len(flat), seqs)


def _replaying(handle, layer: int, output: object):
    """Layers 0..layer-1 replay the cached input of ``layer`` (the output of layer-1); restored on exit."""
    return replayed(handle.model, {handle.adapter.layer(i): output for i in range(layer)})


def _logits(handle, p: _Problem) -> torch.Tensor:
    """Logits [n_positions, vocab] (float32) at the loss positions only."""
    inputs = dict(input_ids=p.ids, attention_mask=p.mask, position_ids=(p.mask.cumsum(-1) - 1).clamp(min=0),
                  use_cache=False)
    inputs = {k: (v.to(handle.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    return logits_at(handle, inputs, p.rows, p.cols).float()


class _Suffix:
    """Rows split at the subject's last token: positions before it never change (δ is added there, at layer
    ℓ), so the prefixes run once, clean, and every step runs only the suffixes on a copy of their key/value
    cache. The suffixes' layers below ℓ do not change either: after ``record_below`` they are replayed.
    Logits come from the loss positions only."""

    def __init__(self, handle, p: _Problem, layer: int) -> None:
        self.handle, self.layer, self.below = handle, layer, None
        model = handle.model
        self.body, self.head = body_and_head(model)  # not None: _suffix_forward checked
        split = p.index.tolist()
        pre = [s[:i] for s, i in zip(p.seqs, split, strict=True)]
        self.ids, suf_mask = handle.tokens.pad([s[i:] for s, i in zip(p.seqs, split, strict=True)], "right")
        self.rows, self.cols = p.rows, [c - split[r] for r, c in zip(p.rows, p.cols, strict=True)]
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

    def _dev(self, **kw: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.to(self.handle.device) for k, v in kw.items()}

    def logits(self) -> torch.Tensor:
        extra = {self.cache_kw: copy.deepcopy(self.cache), "use_cache": True} if self.cache is not None else {}
        replay = _replaying(self.handle, self.layer, self.below) if self.below is not None \
            else contextlib.nullcontext()
        with replay:
            hidden = self.body(**self._dev(input_ids=self.ids, attention_mask=self.mask,
                                           position_ids=self.positions), **extra).last_hidden_state  # [rows, S, d]
        return self.head(hidden[self.rows, self.cols]).float()  # [n_positions, vocab]

    @torch.no_grad()
    def record_below(self) -> torch.Tensor:
        """One clean pass (δ is added at ℓ, above what it records) that keeps the output of layer ℓ-1."""
        logits, self.below = _with_input_of(self.handle, self.layer, self.logits)
        return logits


class _Sites:
    """Forward hooks that add δ at each row's subject-last index, and record the clean values at step 0."""

    def __init__(self, handle, paths: dict[str, str], index: torch.Tensor) -> None:
        self.adapter = handle.adapter
        self.index = index.to(handle.device)
        self.delta: dict[str, torch.Tensor] = {}
        self.init: dict[str, torch.Tensor] = {}
        self.enabled = True
        self._hooks = [get_module(handle.model, path).register_forward_hook(self._hook(site))
                       for site, path in paths.items()]

    def set_index(self, index: torch.Tensor) -> None:
        self.index = index.to(self.index.device)

    def _hook(self, site: str):
        def add(_m: nn.Module, _a: tuple, out: object) -> object:
            if not self.enabled:
                return None
            h = self.adapter.hidden(out)  # [rows, seq, d]
            at = (torch.arange(h.shape[0], device=h.device), self.index)
            if site not in self.init:  # v₀: clean value at the plain prompt (row 0 = the bare "{}" template)
                self.init[site] = h[0, self.index[0]].detach().float()
                self.delta[site] = torch.zeros_like(self.init[site], requires_grad=True)
            h = h.index_put(at, h[at] + self.delta[site].to(h.dtype))
            return self.adapter.with_hidden(out, h)

        return add

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def optimize_value(handle, request: EditRequest, layer: int, sites: Sequence[str], groups: TemplateGroups,
                   opts: ValueOptions) -> ValueResult:
    """v* per site for one request (see the module docstring for the loss)."""
    p = _problem(handle, request, groups)
    sites_ = _Sites(handle, {s: site_path(handle.adapter, s, layer) for s in sites}, p.index)
    losses: list[float] = []
    try:
        with torch.enable_grad():
            logits, below = _clean_pass(handle, p, layer)  # records v₀ and creates δ = 0
            kl_init = F.log_softmax(logits[-1:], -1).detach()  # [1, vocab]
            forward = _suffix_forward(handle, p, sites_, logits, layer)
            if forward is None:  # the prefix cache did not reproduce the logits: replay the lower layers
                ctx = _replaying(handle, layer, below) if layer > 0 else contextlib.nullcontext()
                forward = lambda: _logits(handle, p)  # noqa: E731
            else:
                ctx = contextlib.nullcontext()
            opt = torch.optim.Adam(list(sites_.delta.values()), lr=opts.lr)
            with ctx:
                for step in range(opts.steps):
                    if step > 0:
                        logits = forward()
                    loss, confident = _loss(p, logits, kl_init, sites_, opts)
                    losses.append(loss.item())
                    if loss < opts.early_stop or step == opts.steps - 1 or confident:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    _clamp(sites_, opts.clamp)
    finally:
        sites_.close()
    log.debug("value optimisation at layer %d: loss %s", layer, " ".join(f"{x:.3f}" for x in losses))
    return ValueResult({k: v.detach() for k, v in sites_.init.items()},
                       {k: v.detach().clone() for k, v in sites_.delta.items()}, losses)


def _clean_pass(handle, p: _Problem, layer: int) -> tuple[torch.Tensor, object]:
    """Step 0 on the full rows; also captures the input of layer ℓ (the output of layer ℓ-1)."""
    return _with_input_of(handle, layer, lambda: _logits(handle, p))


def _with_input_of(handle, layer: int, forward) -> tuple[torch.Tensor, object]:
    """``forward()``'s result and what entered layer ``layer`` meanwhile (detached; None for layer 0)."""
    if layer == 0:
        return forward(), None
    got: dict[str, object] = {}
    hook = get_module(handle.model, handle.adapter.layer(layer - 1)).register_forward_hook(
        lambda m, a, out: got.setdefault("out", _detach(handle.adapter, out)))
    try:
        return forward(), got["out"]
    finally:
        hook.remove()


def _suffix_forward(handle, p: _Problem, sites: _Sites, clean: torch.Tensor, layer: int):
    """The suffix-only forward (layers ≥ ``layer`` only) when it reproduces the clean logits (checked here,
    once), else None."""
    if body_and_head(handle.model) is None:
        return None
    sites.enabled = False  # the clean prefix pass carries no δ
    try:
        suffix = _Suffix(handle, p, layer)
    finally:
        sites.enabled = True
    sites.set_index(suffix.index)
    got = suffix.record_below()
    clean = clean.detach()
    tol = 1e-3 if handle.dtype == torch.float32 else 5e-2
    diff = float((got - clean).abs().max()) if got.shape == clean.shape else float("inf")
    if diff <= tol * max(1.0, float(clean.abs().max())):
        return suffix.logits
    log.warning("prefix key/value cache changed the logits (max diff %.3g); using full forwards", diff)
    sites.set_index(p.index)
    return None


def _detach(adapter, out: object) -> object:
    return adapter.with_hidden(out, adapter.hidden(out).detach())


def _loss(p: _Problem, logits: torch.Tensor, kl_init: torch.Tensor, sites: _Sites,
          opts: ValueOptions) -> tuple[torch.Tensor, bool]:
    """NLL (mean over rewriting prompts of the per-token mean) + KL + weight decay; and PMET's stop flag."""
    logp = F.log_softmax(logits, -1)  # [n_positions, vocab]
    tgt = logp[:-1]
    token_nll = -tgt.gather(1, p.labels[:, None].to(tgt.device))[:, 0]  # [n_target_positions]
    owner = p.owner.to(tgt.device)
    per_row = torch.zeros(p.n_rewrite, device=tgt.device).index_add(0, owner, token_nll)
    per_row = per_row / torch.bincount(owner, minlength=p.n_rewrite).clamp(min=1)
    nll = per_row.mean()
    kl = opts.kl_factor * F.kl_div(logp[-1:], kl_init, log_target=True, reduction="batchmean")
    wd = sum(opts.weight_decay * d.norm() / sites.init[s].norm() ** 2 for s, d in sites.delta.items())
    confident = False
    if opts.confident_stop and bool((tgt.argmax(-1).cpu() == p.labels).all()):
        nll = 0.1 * nll
        confident = float(kl.detach()) / max(opts.kl_factor, 1e-12) <= 0.01
    return nll + kl + wd, confident


@torch.no_grad()
def _clamp(sites: _Sites, factor: float) -> None:
    """Project each δ onto the ball ‖δ‖ ≤ factor · ‖v₀‖."""
    for s, d in sites.delta.items():
        limit = factor * sites.init[s].norm()
        n = d.norm()
        if n > limit:
            d.mul_(limit / n)
