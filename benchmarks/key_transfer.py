"""Why does a ROME edit miss a paraphrase? Measure how much of the edit the paraphrase's key receives.

A ROME edit is ΔW = Λ uᵀ with u ∝ C⁻¹k*, normalised so that ΔW k* = Λ (the whole inserted value). A
paraphrase whose subject-last key is k_p receives ΔW k_p = t · Λ with the *transfer*

    t = uᵀk_p / uᵀk*

(1 = the paraphrase gets the full edit, 0 = none of it). This script reads a finished ROME run
(``lmedit bench --method rome ...`` output: cases.jsonl), recomputes k* (mean over the run's context
templates) and every paraphrase key at the edited layer on the unedited model, and reports generalization
by transfer bin. If generalization tracks t, the paraphrases fail because the subject's last token is
represented differently in their context (the key), not because the inserted value is too weak.

    python benchmarks/key_transfer.py --run runs/rome-zsre-200 [--dataset zsre] \
        [--out benchmarks/results/key_transfer.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _report import write_report

from lmedit.data import load_dataset
from lmedit.locate.keys import compute_keys, gather, subject_last
from lmedit.locate.pipeline import templates_for
from lmedit.locate.stats import second_moments
from lmedit.locate.templates import flatten, group_mean
from lmedit.models.loading import load_model
from lmedit.registry import get_editor


def transfers(handle, case, layer: int, groups, C: torch.Tensor) -> tuple[list[float], float]:
    """Transfer t of every paraphrase, and of the bare edit prompt (no context template)."""
    req = case.request
    keys = compute_keys(handle, [req], [layer], groups)[layer][0].double()
    k_star = group_mean(keys, flatten(groups)[1])  # r-ROME's k*: the mean over the context templates
    u = torch.linalg.solve(C.double(), k_star)
    base = float(u @ k_star)
    rows = [subject_last(handle.tokens, p.replace(req.subject, "{}", 1), req.subject) for p in case.paraphrases]
    rows.append(subject_last(handle.tokens, req.template, req.subject))
    (k_rows,) = gather(handle, rows, [(handle.adapter.mlp_out.format(layer), "input")])
    t = [float(u @ k.double()) / base for k in k_rows]
    return t[:-1], t[-1]


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):  # average ranks over ties
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished `lmedit bench --method rome` output directory")
    ap.add_argument("--dataset", default="zsre")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="benchmarks/results/key_transfer.md")
    args = ap.parse_args()

    rows = [json.loads(line) for line in open(Path(args.run) / "cases.jsonl")]
    gen = {r["case_id"]: r["post"]["generalization"]["value"] for r in rows if "generalization" in r.get("post", {})}
    handle = load_model(args.model)
    cfg = get_editor("rome").config_for(handle)
    (layer,) = cfg.layers
    groups = templates_for(handle, cfg)
    C = second_moments(handle, [layer], tokens=cfg.mom2_tokens, corpus=cfg.mom2_corpus)[layer]
    cases = {c.case_id: c for c in load_dataset(args.dataset, n=max(gen) + 1)}
    t0 = time.time()
    ts, gs, bare = [], [], []
    for cid, g in sorted(gen.items()):
        t, t_bare = transfers(handle, cases[cid], layer, groups, C)
        ts.append(statistics.mean(t))
        gs.append(g)
        bare.append(t_bare)
    bins = [(-9.0, 0.5), (0.5, 0.75), (0.75, 0.9), (0.9, 9.0)]
    lines = [f"# Key transfer of ROME edits ({args.dataset}, {len(gs)} cases, layer {layer})", "",
             f"`python benchmarks/key_transfer.py --run {args.run} --dataset {args.dataset}` "
             f"({time.time() - t0:.0f} s). t = uᵀk_p / uᵀk*: the share of the inserted value a prompt's key "
             "receives (u ∝ C⁻¹k*).", "",
             f"- mean transfer to the paraphrases: {statistics.mean(ts):.3f} (median {statistics.median(ts):.3f});"
             f" to the bare edit prompt: {statistics.mean(bare):.3f}",
             f"- Spearman correlation of per-case transfer with generalization: {spearman(ts, gs):.3f}", "",
             "| paraphrase transfer t | cases | mean generalization |", "|---|---:|---:|"]
    for lo, hi in bins:
        sel = [g for t, g in zip(ts, gs, strict=True) if lo <= t < hi]
        label = f"< {hi}" if lo < -1 else (f"≥ {lo}" if hi > 1.5 else f"{lo}–{hi}")
        lines.append(f"| {label} | {len(sel)} | {100 * statistics.mean(sel):.1f} |" if sel else f"| {label} | 0 | – |")
    lines.append(f"| all | {len(gs)} | {100 * statistics.mean(gs):.1f} |")
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
