"""Closed-form weight updates of the locate-then-edit family, in float64.

Conventions: W is [d_out, d_in] (keys k ∈ R^{d_in} are W's inputs, values v = W k ∈ R^{d_out}); K is
[d_in, B] (one key per column), R is [d_out, B] (what each key's output must gain), C = E[k kᵀ] is
[d_in, d_in]. Every solver returns low-rank factors (a [d_out, r], b [d_in, r]) with ΔW = a bᵀ, which is
both cheaper to store and exactly what each formula produces.
"""

from __future__ import annotations

import math

import torch

from ..edits import EditError

Factors = tuple[torch.Tensor, torch.Tensor]


def _f64(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.detach().to(torch.float64) for x in xs]


def check_finite(what: str, *xs: torch.Tensor) -> None:
    """Refuse (EditError) an update with NaN/inf anywhere; nothing has been written yet."""
    for x in xs:
        if not torch.isfinite(x).all():
            raise EditError(f"refusing edit: the {what} solve produced NaN/inf (ill-conditioned statistics or "
                            "keys); the model is unchanged -- try more statistics tokens or a larger λ")


def rank_one(k_u: torch.Tensor, k_den: torch.Tensor, residual: torch.Tensor, C: torch.Tensor | None = None,
             min_division: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ROME (Meng et al. 2022, eq. 2): ΔW = Λ uᵀ, u = C⁻¹k_u / ‖C⁻¹k_u‖, Λ = residual / (k_denᵀ u).

    With k_u = k_den = k* and residual = v* − W k* this is the paper's Ŵ = W + Λ (C⁻¹k*)ᵀ with
    Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*), so Ŵ k* = v*. Returns (a [d_out,1], b [d_in,1], division factor), the
    factor being the scale-free |k_denᵀ u| / ‖k_den‖; below ``min_division`` the edit is refused (the
    update norm would explode: the "disabling edits" of original ROME).
    """
    k_u, k_den, residual = _f64(k_u, k_den, residual)
    u = torch.linalg.solve(C.to(torch.float64), k_u) if C is not None else k_u  # [d_in]
    u = u / u.norm()
    den = float(k_den @ u)
    division = abs(den) / float(k_den.norm())
    if not math.isfinite(division) or division < min_division:
        raise EditError(f"refusing edit: division factor |kᵀu|/‖k‖ = {division:.3g} is below {min_division:g}, "
                        "so the rank-one update would explode; the model is unchanged (use key_mode='consistent')")
    a, b = (residual / den)[:, None], u[:, None]
    check_finite("rank-one", a, b)
    return a, b, division


def least_squares(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> Factors:
    """MEMIT (Meng et al. 2023, eq. 14): ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ = a bᵀ with a = R, b = (λC + K Kᵀ)⁻¹ K."""
    K, R, C = _f64(K, R, C)
    b = torch.linalg.solve(lam * C + K @ K.T, K)  # [d_in, B]; the matrix is symmetric
    check_finite("least-squares", b)
    return R, b


def equality_constrained(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float, mu: float = 0.0,
                         eps: float = 0.1) -> Factors:
    """EMMET (Gupta et al. 2024): min ‖ΔW C'^{1/2}‖ s.t. ΔW K = R, C' = λC + μI.

    ΔW = R D⁻¹ Kᵀ C'⁻¹ with D = Kᵀ C'⁻¹ K + εI (ε regularises ill-conditioned D; pinv if singular):
    a = R D⁻¹, b = C'⁻¹ K.
    """
    K, R, C = _f64(K, R, C)
    c = lam * C + mu * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    b = torch.linalg.solve(c, K)  # [d_in, B] = C'⁻¹K
    D = K.T @ b + eps * torch.eye(K.shape[1], dtype=K.dtype, device=K.device)  # [B, B]
    try:
        a = torch.linalg.solve(D.T, R.T).T  # [d_out, B] = R D⁻¹
    except RuntimeError:
        a = R @ torch.linalg.pinv(D)
    check_finite("equality-constrained", a, b)
    return a, b


def nullspace_projector(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """AlphaEdit (Fang et al. 2025): P = U₀U₀ᵀ, U₀ = eigenvectors of C with eigenvalue < threshold.

    Returns (P [d_in, d_in] float64, dimension of the null space).
    """
    (C,) = _f64(C)
    evals, evecs = torch.linalg.eigh((C + C.T) / 2)
    U0 = evecs[:, evals < threshold]
    return U0 @ U0.T, int(U0.shape[1])


def null_space_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, prior_kkt: torch.Tensor | None,
                      alpha: float) -> Factors:
    """AlphaEdit: ΔW = Xᵀ with [P (K Kᵀ + K_p K_pᵀ) + αI] X = P K Rᵀ, i.e. a = R, b = M⁻¹ P K.

    ΔW = R (M⁻¹PK)ᵀ lies in P's row space, so ΔW k ≈ 0 for preserved keys (C k ≈ λ_big k).
    """
    K, R, P = _f64(K, R, P)
    A = K @ K.T + (prior_kkt.to(torch.float64) if prior_kkt is not None else 0.0)
    M = P @ A + alpha * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    b = torch.linalg.solve(M, P @ K)  # [d_in, B]
    check_finite("null-space", b)
    return R, b


def spread(residual: torch.Tensor, remaining: int, rule: str = "linear") -> torch.Tensor:
    """The share of the remaining residual a layer takes: MEMIT R/(L−i) ("linear"), PMET R/√(L−i) ("sqrt")."""
    if rule == "linear":
        return residual / remaining
    if rule == "sqrt":
        return residual / math.sqrt(remaining)
    raise ValueError(f"unknown spread rule {rule!r}; use 'linear' or 'sqrt'")
