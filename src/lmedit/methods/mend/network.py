"""MEND's editor network (Mitchell et al. 2022, §3.1).

For a linear map with weight W [d_out, d_in] the gradient of one edit is ∇W = Σ_t δ_t u_tᵀ. MEND maps each
token's (u_t, δ_t) -- normalised per dimension with running statistics -- through a small residual MLP g
to pseudo-factors (u'_t, δ'_t) and edits with W' = W − α_ℓ Σ_t δ'_t u'_tᵀ (eq. 3-4), a low-rank update.
One g is shared by all edited matrices of the same shape; a per-matrix scale and shift on g's input says
which matrix it is working on, and each matrix has its own learned step size α_ℓ.
"""

from __future__ import annotations

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Per-dimension mean/std by Welford's online algorithm; identity until two samples are seen."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch x [n, dim] into the statistics (Chan et al.'s parallel form of Welford)."""
        x = x.to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)  # [dim]
        m2_b = ((x - mean_b) ** 2).sum(0)  # [dim]
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count.fill_(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).clamp_min(1e-12).sqrt()
        return ((x - self.mean.to(x.dtype)) / (std.to(x.dtype) + 1e-8))


class IDMLP(nn.Module):
    """Residual low-rank MLP, identity at initialisation: h ← h + U ReLU(V h + b) (U starts at 0)."""

    def __init__(self, dim: int, rank: int, n_matrices: int, n_blocks: int = 2) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n_matrices, dim))
        self.shift = nn.Parameter(torch.zeros(n_matrices, dim))
        self.down = nn.ModuleList(nn.Linear(dim, rank) for _ in range(n_blocks))
        self.up = nn.ModuleList(nn.Linear(rank, dim) for _ in range(n_blocks))
        for u in self.up:
            nn.init.zeros_(u.weight)
            nn.init.zeros_(u.bias)

    def forward(self, x: torch.Tensor, m: int) -> torch.Tensor:
        h = x * self.scale[m] + self.shift[m]  # [T, dim]
        for down, up in zip(self.down, self.up, strict=True):
            h = h + up(torch.relu(down(h)))
        return h


class MENDNet(nn.Module):
    """All of one MEND editor's parameters: shared g per shape, normalisers and step sizes per matrix.

    Args:
        shapes: module path -> (d_out, d_in) of the edited weight, in edit order.
        rank: rank of g's hidden layer (capped at its input dimension d_in + d_out).
        edit_lr: initial per-matrix step size α_ℓ.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, edit_lr: float) -> None:
        super().__init__()
        self.paths = list(shapes)
        self.shapes = dict(shapes)
        groups: dict[str, list[str]] = {}
        for p, (d_out, d_in) in shapes.items():
            groups.setdefault(f"{d_in}x{d_out}", []).append(p)
        self.group_of = {p: (g, members.index(p)) for g, members in groups.items() for p in members}
        self.nets = nn.ModuleDict({
            g: IDMLP(sum(shapes[m[0]]), min(rank, sum(shapes[m[0]])), len(m)) for g, m in groups.items()})
        self.u_norm = nn.ModuleList(RunningNorm(shapes[p][1]) for p in self.paths)
        self.d_norm = nn.ModuleList(RunningNorm(shapes[p][0]) for p in self.paths)
        self.lrs = nn.Parameter(torch.full((len(self.paths),), float(edit_lr)))

    def update_stats(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, p in enumerate(self.paths):
            u, d = factors[p]
            self.u_norm[i].update(u)
            self.d_norm[i].update(d)

    def forward(self, path: str, u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-gradient factors: (A [d_out, T], B [d_in, T]) with ΔW = A Bᵀ = −α Σ_t δ'_t u'_tᵀ."""
        i = self.paths.index(path)
        d_out, d_in = self.shapes[path]
        group, m = self.group_of[path]
        x = torch.cat([self.u_norm[i](u), self.d_norm[i](d)], dim=-1)  # [T, d_in + d_out]
        h = self.nets[group](x, m)
        u2, d2 = h[:, :d_in], h[:, d_in:]  # [T, d_in], [T, d_out]
        return (-self.lrs[i] * d2).T, u2.T
