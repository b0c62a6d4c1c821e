"""Closed-form solvers of the locate-then-edit family against naive formulas on small random matrices."""

from __future__ import annotations

import pytest
import torch

from lmedit.edits import EditError
from lmedit.locate import solvers

D_OUT, D_IN, B = 6, 10, 3


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, D_IN, generator=g, dtype=torch.float64)
    C = X.T @ X / 200  # a second moment: symmetric positive definite
    K = torch.randn(D_IN, B, generator=g, dtype=torch.float64)
    R = torch.randn(D_OUT, B, generator=g, dtype=torch.float64)
    W = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    return C, K, R, W


def test_rank_one_matches_rome_closed_form(data):
    C, K, _, W = data
    k = K[:, 0]
    v_star = torch.randn(D_OUT, dtype=torch.float64)
    a, b, division = solvers.rank_one(k, k, v_star - W @ k, C)
    cik = torch.linalg.inv(C) @ k
    naive = torch.outer((v_star - W @ k) / (cik @ k), cik)  # Λ (C⁻¹k)ᵀ, Λ = (v* − Wk)/((C⁻¹k)ᵀk)
    assert torch.allclose(a @ b.T, naive, atol=1e-10)
    assert torch.allclose((W + a @ b.T) @ k, v_star, atol=1e-10)
    assert division == pytest.approx(float(k @ (cik / cik.norm()) / k.norm()))


def test_rank_one_without_covariance_uses_the_key(data):
    _, K, _, W = data
    k = K[:, 0]
    a, b, _ = solvers.rank_one(k, k, torch.ones(D_OUT, dtype=torch.float64))
    assert torch.allclose(b[:, 0], k / k.norm())
    assert torch.allclose((a @ b.T) @ k, torch.ones(D_OUT, dtype=torch.float64))


def test_rank_one_refuses_a_tiny_division_factor(data):
    C, K, _, _ = data
    k_u = K[:, 0]
    u = torch.linalg.solve(C, k_u)
    k_den = torch.randn(D_IN, dtype=torch.float64)
    k_den = k_den - (k_den @ u) / (u @ u) * u  # orthogonal to u: k_denᵀu = 0
    with pytest.raises(EditError, match="division factor"):
        solvers.rank_one(k_u, k_den, torch.ones(D_OUT), C, min_division=1e-6)


def test_least_squares_matches_memit_formula_and_is_optimal(data):
    C, K, R, _ = data
    lam = 3.0
    a, b = solvers.least_squares(K, R, C, lam)
    naive = R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)
    assert torch.allclose(a @ b.T, naive, atol=1e-10)
    # ΔW minimises ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ): the gradient vanishes
    dW = (a @ b.T).requires_grad_(True)
    loss = ((dW @ K - R) ** 2).sum() + lam * torch.trace(dW @ C @ dW.T)
    loss.backward()
    assert dW.grad.abs().max() < 1e-9


def test_equality_constrained_meets_each_key_exactly(data):
    C, K, R, _ = data
    lam, mu = 2.0, 0.5
    a, b = solvers.equality_constrained(K, R, C, lam, mu, eps=0.0)
    cp = lam * C + mu * torch.eye(D_IN, dtype=torch.float64)
    cpi = torch.linalg.inv(cp)
    naive = R @ torch.linalg.inv(K.T @ cpi @ K) @ K.T @ cpi
    assert torch.allclose(a @ b.T, naive, atol=1e-9)
    assert torch.allclose((a @ b.T) @ K, R, atol=1e-9)
    a2, b2 = solvers.equality_constrained(K, R, C, lam, mu, eps=0.1)
    naive2 = R @ torch.linalg.inv(K.T @ cpi @ K + 0.1 * torch.eye(B, dtype=torch.float64)) @ K.T @ cpi
    assert torch.allclose(a2 @ b2.T, naive2, atol=1e-9)


def test_nullspace_projector(data):
    C, _, _, _ = data
    evals, evecs = torch.linalg.eigh(C)
    threshold = float(evals[4])  # 4 eigenvalues strictly below
    P, dim = solvers.nullspace_projector(C, threshold)
    assert dim == 4
    assert torch.allclose(P, P.T, atol=1e-12) and torch.allclose(P @ P, P, atol=1e-10)
    assert torch.allclose(P @ evecs[:, -1], torch.zeros(D_IN, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(P @ evecs[:, 0], evecs[:, 0], atol=1e-10)


def test_null_space_update_matches_alphaedit_solve(data):
    C, K, R, _ = data
    P, _ = solvers.nullspace_projector(C, float(torch.linalg.eigvalsh(C)[5]))
    prior = torch.randn(D_IN, 2, dtype=torch.float64)
    prior = prior @ prior.T
    a, b = solvers.null_space_update(K, R, P, prior, alpha=0.7)
    X = torch.linalg.solve(P @ (K @ K.T + prior) + 0.7 * torch.eye(D_IN, dtype=torch.float64), P @ K @ R.T)
    assert torch.allclose(a @ b.T, X.T, atol=1e-10)
    # α b = P (K − A b), so b lies in P's range and ΔW k = 0 for every preserved direction (large eigenvalue)
    assert torch.allclose(P @ b, b, atol=1e-9)
    top = torch.linalg.eigh(C).eigenvectors[:, -1]
    assert (a @ b.T @ top).abs().max() < 1e-9
    assert (a @ b.T).abs().max() > 1e-3


def test_spread_rules():
    r = torch.full((2, 3), 6.0)
    assert torch.equal(solvers.spread(r, 3, "linear"), torch.full((2, 3), 2.0))
    assert torch.allclose(solvers.spread(r, 4, "sqrt"), torch.full((2, 3), 3.0))
    with pytest.raises(ValueError, match="spread rule"):
        solvers.spread(r, 2, "cubic")


def test_non_finite_solves_are_refused(data):
    C, K, R, _ = data
    K = K.clone()
    K[0, 0] = float("nan")
    with pytest.raises(EditError, match="NaN"):
        solvers.least_squares(K, R, C, 1.0)
