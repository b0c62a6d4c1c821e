"""Per-request optimisers of the value optimisation (:mod:`lmedit.locate.values`), one per request of a batch.

The loop in ``values`` evaluates every running request's loss at its current δ in one forward, then asks each
request's stepper what the evaluation means (:meth:`evaluated`: does it need the gradient?), runs one backward
over the requests that do, and lets every stepper move its δ (:meth:`step`). Because each stepper only ever
sees its own loss and gradient, requests optimised together in one batch stay independent.

- :class:`AdamStepper` (``"adam"``, ROME's optimiser): one Adam step per evaluation.
- :class:`LBFGSStepper` (``"lbfgs"``): limited-memory BFGS with a backtracking (Armijo) line search that
  costs no extra forward: a trial point that does not lower the loss enough is rejected *by the next
  evaluation*, which then needs no backward, and the step is shortened. δ is a short vector (576 numbers for
  SmolLM2) on a smooth loss, so curvature pairs make most steps land where Adam needs several.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

OPTIMIZERS = ("adam", "lbfgs")


class AdamStepper:
    """torch Adam on ``params`` (δ per site): every evaluation is kept and followed by one step."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float) -> None:
        self.opt = torch.optim.Adam(list(params), lr=lr)
        self.loss = math.inf

    def evaluated(self, loss: float) -> bool:
        """Record the loss at the current δ; True: the next step needs its gradient."""
        self.loss = loss
        return True

    def zero_grad(self) -> None:
        """Clear δ's gradient before the backward."""
        self.opt.zero_grad()

    def step(self) -> None:
        """One Adam step from δ's gradient."""
        self.opt.step()

    def finish(self) -> None:
        """Leave δ at the best point kept (for Adam, the last one)."""


class LBFGSStepper:
    """L-BFGS (two-loop recursion, ``history`` curvature pairs) with an Armijo backtracking line search in
    which every trial point is one evaluation of the batched loop.

    δ (all sites, flattened) moves from the accepted point x along d: trial = x + t·d. The trial is accepted
    when f(trial) ≤ f(x) + c1·∇f(x)ᵀ(trial − x); otherwise t shrinks (minimum of the quadratic through f(x),
    ∇f(x)ᵀd and f(trial), kept in [0.1 t, 0.5 t]) and δ goes back to x + t·d. With ``radii`` every trial is
    projected onto the clamp balls, and on a ball's surface the direction loses its outward part (it moves
    along the sphere). The first direction is the steepest descent, scaled to the length of Adam's first step
    (``lr`` per coordinate); later ones use t = 1 and the usual sᵀy/yᵀy initial scaling.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, radii: Sequence[float] | None = None,
                 history: int = 10, c1: float = 1e-4) -> None:
        self.params, self.lr, self.history, self.c1 = list(params), lr, history, c1
        self.radii = list(radii) if radii is not None else [math.inf] * len(self.params)
        ends = torch.tensor([p.numel() for p in self.params]).cumsum(0).tolist()
        self.blocks = [slice(a, b) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        self.loss = math.inf  # f(x), the loss at the accepted point
        self.x: torch.Tensor | None = None
        self.g: torch.Tensor | None = None
        self.d: torch.Tensor | None = None
        self.t = 1.0
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1/sᵀy)
        self._trial: tuple[torch.Tensor, float] | None = None

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).double()

    def _set(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            at = 0
            for p in self.params:
                p.copy_(flat[at : at + p.numel()].view_as(p).to(p.dtype))
                at += p.numel()

    def evaluated(self, loss: float) -> bool:
        """Accept or reject the current trial δ by its loss; True: accepted, its gradient is needed."""
        trial = self._flat()
        accept = self.x is None or (math.isfinite(loss) and
                                    loss <= self.loss + self.c1 * float(self.g @ (trial - self.x)))
        if accept:
            self._trial = (trial, loss)
            self.loss = loss
        else:
            self._shrink(loss)
        return accept

    def zero_grad(self) -> None:
        """Clear δ's gradient before the backward."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Move δ to the next trial: a shorter step after a rejection, else a new L-BFGS direction."""
        if self._trial is None:  # rejected: retry closer to x
            self._set(self._project(self.x + self.t * self.d))
            return
        trial, _ = self._trial
        self._trial = None
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                       for p in self.params]).double()
        if self.x is not None:
            s, y = trial - self.x, g - self.g
            sy = float(s @ y)
            if sy > 1e-10 * float(s @ s):  # curvature condition; otherwise skip the pair
                self.pairs = [*self.pairs, (s, y, 1.0 / sy)][-self.history:]
        self.x, self.g = trial, g
        d = self._tangent(self._direction(g))
        if float(g @ d) >= 0:  # not a descent direction (a bad pair): restart from steepest descent
            self.pairs, d = [], self._tangent(-g)
        self.d = d
        if not self.pairs:
            gn = float(g.norm())
            self.t = self.lr * math.sqrt(g.numel()) / gn if gn > 0 else 0.0
        else:
            self.t = 1.0
        self._set(self._project(self.x + self.t * self.d))

    def _shrink(self, loss: float) -> None:
        slope = float(self.g @ self.d)  # < 0
        t = self.t
        if math.isfinite(loss):
            curv = loss - self.loss - slope * t
            t_new = -slope * t * t / (2 * curv) if curv > 0 else 0.5 * t
        else:
            t_new = 0.1 * t
        self.t = min(max(t_new, 0.1 * t), 0.5 * t)

    def _tangent(self, d: torch.Tensor) -> torch.Tensor:
        """``d`` without its outward part in each block whose δ lies on its ball ‖δ‖ = radius: the step then
        moves along the sphere (and the projection brings it back onto it) instead of being cut short."""
        d = d.clone()
        for sl, r in zip(self.blocks, self.radii, strict=True):
            x = self.x[sl]
            xx = float(x @ x)
            if xx > 0 and math.sqrt(xx) >= r * (1 - 1e-4) and float(d[sl] @ x) > 0:
                d[sl] -= float(d[sl] @ x) / xx * x
        return d

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` with each block scaled back onto its ball."""
        z = z.clone()
        for sl, r in zip(self.blocks, self.radii, strict=True):
            n = float(z[sl].norm())
            if n > r:
                z[sl] *= r / n
        return z

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """−H g by the two-loop recursion."""
        q, alphas = g.clone(), []
        for s, y, rho in reversed(self.pairs):
            a = rho * float(s @ q)
            q -= a * y
            alphas.append(a)
        if self.pairs:
            s, y, _ = self.pairs[-1]
            q *= float(s @ y) / float(y @ y)
        for (s, y, rho), a in zip(self.pairs, reversed(alphas), strict=True):
            b = rho * float(y @ q)
            q += (a - b) * s
        return -q

    def finish(self) -> None:
        """δ back to the accepted point when the last trial was not accepted."""
        if self.x is not None and self._trial is None:
            self._set(self.x)


def make_stepper(name: str, params: Sequence[torch.Tensor], lr: float,
                 radii: Sequence[float] | None = None) -> AdamStepper | LBFGSStepper:
    """The stepper called ``name`` (one of :data:`OPTIMIZERS`) over ``params``; ``radii``: the clamp radius of
    each (L-BFGS keeps its steps inside; Adam's steps are projected by the caller)."""
    if name == "adam":
        return AdamStepper(params, lr)
    if name == "lbfgs":
        return LBFGSStepper(params, lr, radii)
    raise ValueError(f"unknown value optimizer {name!r}; use one of {list(OPTIMIZERS)}")
