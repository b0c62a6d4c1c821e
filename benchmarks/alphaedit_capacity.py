"""How much room AlphaEdit's null space leaves for a sequence of edits on SmolLM2-135M.

AlphaEdit projects every update onto the null space of the preserved keys: P = U₀U₀ᵀ over the eigenvectors of
C = E[k kᵀ] (WikiText keys of the edited layer) whose eigenvalue is below ``nullspace_threshold``. An edit's
update then acts on its key only through P k, and the keys of earlier edits are kept apart from it inside that
same subspace (the K_p K_pᵀ term). So the null space's dimension d₀ bounds how many edits the layer can hold
apart: once the projected keys of earlier edits span it, a new key's projection lies mostly in their span and
its update moves their outputs too. This measures, per edited layer, d₀, the share of an edit key's energy
that falls in the null space, and, along the first N ZsRE edit requests (the keys AlphaEdit uses: each
request's key averaged over the context templates, on the unedited model), the numerical rank of the
projected keys and the share of each new projected key that is *new* (outside the span of the earlier ones).

    python benchmarks/alphaedit_capacity.py --n 998          # writes results/alphaedit_capacity.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _report import write_report

RESULT = Path(__file__).parent / "results" / "alphaedit_capacity.md"
WINDOWS = ((1, 10), (91, 100), (291, 300), (491, 500), (901, 998))


def novel_share(X: torch.Tensor, tol: float = 1e-6) -> list[float]:
    """For each column j of X [d, N], the share of ‖x_j‖² outside the span of columns 0..j-1 (Gram–Schmidt)."""
    Q = torch.zeros(X.shape[0], 0, dtype=X.dtype)
    out = []
    for j in range(X.shape[1]):
        x = X[:, j]
        r = x - Q @ (Q.T @ x)
        r = r - Q @ (Q.T @ r)  # twice: keeps the basis orthonormal in float64
        norm2 = float(x @ x)
        out.append(float(r @ r) / norm2 if norm2 > 0 else 0.0)
        if r.norm() > tol * x.norm():
            Q = torch.cat([Q, (r / r.norm())[:, None]], dim=1)
    return out


def rank(X: torch.Tensor, rel: float = 1e-3) -> int:
    s = torch.linalg.svdvals(X)
    return int((s > rel * s[0]).sum()) if s.numel() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=998, help="the first N ZsRE eval requests")
    ap.add_argument("--thresholds", default="0.02,0.005,0.002", help="null-space thresholds to compare (preset first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lmedit
    from lmedit.locate.keys import compute_keys
    from lmedit.locate.pipeline import templates_for
    from lmedit.locate.solvers import nullspace_projector
    from lmedit.locate.stats import second_moments
    from lmedit.locate.templates import flatten, group_mean

    handle = lmedit.load_model("smollm2-135m")
    editor = lmedit.get_editor("alphaedit")
    cfg = editor.config_for(handle)
    thresholds = [float(x) for x in args.thresholds.split(",")]
    requests = [c.request for c in lmedit.load_dataset("zsre", n=args.n)]
    C = second_moments(handle, cfg.layers, tokens=cfg.mom2_tokens, corpus=cfg.mom2_corpus, progress=True)
    groups = templates_for(handle, cfg)
    _, gid = flatten(groups)
    keys = compute_keys(handle, requests, cfg.layers, groups)
    windows = [(a, min(b, len(requests))) for a, b in WINDOWS if a <= len(requests)]
    lines = ["# AlphaEdit's null space on SmolLM2-135M", "",
             f"`python benchmarks/alphaedit_capacity.py --n {args.n}`: AlphaEdit's SmolLM2 preset (layers "
             f"{cfg.layers}, statistics on {cfg.mom2_tokens:,} WikiText tokens), the keys of the first "
             f"{len(requests)} ZsRE eval requests (template-averaged, unedited model). d₀: null-space dimension "
             "(eigenvalues of C below the threshold) of the layer's d_ff; corpus energy: the share of the "
             "WikiText keys' E‖k‖² = tr C inside the null space (what an update confined to it still moves on "
             "ordinary text; AlphaEdit assumes it is near 0); edit energy: median share of an edit key's ‖k‖² "
             "inside the null space; λ_min: smallest eigenvalue of C; rank: numerical rank (σ > 1e-3 σ_max) of "
             "the first N projected keys P K; "
             "new: median share of a projected key's energy outside the span of the earlier ones, over the "
             "edits in each window (1.0: fully apart from every earlier edit; the unprojected keys K for "
             "comparison).", "",
             "| layer | threshold | d₀ / d_ff | corpus energy | edit energy | λ_min | rank of P K at N = "
             + ", ".join(str(b) for _, b in windows) + " | new share of P k, edits "
             + ", ".join(f"{a}–{b}" for a, b in windows) + " | same for K |",
             "|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for layer in cfg.layers:
        K = torch.stack([group_mean(k, gid) for k in keys[layer]]).T.double()  # [d_ff, N]
        novel_k = novel_share(K)
        evals = torch.linalg.eigvalsh(C[layer].double())
        for thr in thresholds:
            P, d0 = nullspace_projector(C[layer], thr)
            corpus = float(evals[evals < thr].sum() / evals.sum())
            PK = P @ K
            energy = statistics.median(float((PK[:, j] @ PK[:, j]) / (K[:, j] @ K[:, j])) for j in range(K.shape[1]))
            novel = novel_share(PK)
            ranks = ", ".join(str(rank(PK[:, :b])) for _, b in windows)
            new = ", ".join(f"{statistics.median(novel[a - 1:b]):.2f}" for a, b in windows)
            new_k = ", ".join(f"{statistics.median(novel_k[a - 1:b]):.2f}" for a, b in windows)
            lines.append(f"| {layer} | {thr:g} | {d0} / {K.shape[0]} | {corpus:.3f} | {energy:.3f} | "
                         f"{float(evals[0]):.2g} | {ranks} | {new} | {new_k} |")
            print(lines[-1], flush=True)
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
