"""PMET on SmolLM2: how the optimised change splits between attention and FFN, and what FFN-only keeps.

PMET optimises two vectors at the last edited layer, δ_attn (attention output) and δ_mlp (FFN output), then
writes the FFN weights only. For each ZsRE case this measures ‖v₀‖ and ‖δ‖ per site and the reliability
(token accuracy of the new target on the plain prompt) with (a) both δ added at the subject's last token
(the optimisation's own condition), (b) δ_mlp only, (c) δ_attn only, (d) PMET's weight edit, for each
clamp factor given.

    python benchmarks/pmet_split.py --n 8 --clamps 1 4          # writes results/pmet_split.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

RESULT = Path(__file__).parent / "results" / "pmet_split.md"
COLUMNS = ("v0_attn", "d_attn", "v0_mlp", "d_mlp", "loss", "pre", "both", "mlp_only", "attn_only", "pmet_edit")


def measure(handle, cases, clamp: float) -> list[dict[str, float]]:
    from lmedit.hooks import get_module
    from lmedit.locate.keys import subject_last
    from lmedit.locate.pipeline import templates_for, value_options
    from lmedit.locate.values import optimize_value, site_path
    from lmedit.methods.pmet import PMET
    from lmedit.metrics.scoring import score_targets

    editor = PMET(clamp_norm_factor=clamp)
    cfg = editor.config_for(handle)
    layer, groups, opts = cfg.layers[-1], templates_for(handle, cfg), value_options(cfg)

    def accuracy(req, deltas: dict[str, torch.Tensor]) -> float:
        index = subject_last(handle.tokens, req.template, req.subject).index
        hooks = []
        for site, d in deltas.items():
            def add(_m, _a, out, d=d):
                if out.shape[1] <= index:
                    return None
                out = out.clone()
                out[:, index] += d.to(out.dtype)
                return out
            hooks.append(get_module(handle.model, site_path(handle.adapter, site, layer)).register_forward_hook(add))
        try:
            return score_targets(handle, [req.text], [req.target_new])[0].accuracy
        finally:
            for h in hooks:
                h.remove()

    rows = []
    for c in cases:
        r = c.request
        v = optimize_value(handle, r, layer, ["attn", "mlp"], groups, opts)
        edit = editor.compute(handle, [r])
        with edit.applied(handle):
            edited = score_targets(handle, [r.text], [r.target_new])[0].accuracy
        rows.append({"v0_attn": float(v.init["attn"].norm()), "d_attn": float(v.delta["attn"].norm()),
                     "v0_mlp": float(v.init["mlp"].norm()), "d_mlp": float(v.delta["mlp"].norm()),
                     "loss": v.losses[-1], "pre": accuracy(r, {}), "both": accuracy(r, dict(v.delta)),
                     "mlp_only": accuracy(r, {"mlp": v.delta["mlp"]}),
                     "attn_only": accuracy(r, {"attn": v.delta["attn"]}), "pmet_edit": edited})
        print(clamp, {k: round(x, 3) for k, x in rows[-1].items()}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="first N ZsRE eval cases")
    ap.add_argument("--clamps", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lmedit

    handle = lmedit.load_model("smollm2-135m")
    cases = lmedit.load_dataset("zsre", n=args.n)
    lines = ["# PMET: attention vs FFN share of the optimised change (SmolLM2-135M)", "",
             f"`python benchmarks/pmet_split.py --n {args.n} --clamps {' '.join(f'{c:g}' for c in args.clamps)}`: "
             f"first {args.n} ZsRE eval cases, last edited layer, means over cases. Norms: ‖v₀‖ and ‖δ‖ per site; "
             "reliability ×100 with both δ injected at the subject's last token, δ_mlp only, δ_attn only, and "
             "after PMET's weight edit (FFN only).", "",
             "| clamp | ‖v₀_attn‖ | ‖δ_attn‖ | ‖v₀_mlp‖ | ‖δ_mlp‖ | value loss | unedited | both δ | δ_mlp only "
             "| δ_attn only | PMET edit |", "|---:|" + "---:|" * 10]
    for clamp in args.clamps:
        rows = measure(handle, cases, clamp)
        mean = {k: statistics.fmean(r[k] for r in rows) for k in COLUMNS}
        acc = {"pre", "both", "mlp_only", "attn_only", "pmet_edit"}
        lines.append(f"| {clamp:g} | " + " | ".join(f"{100 * mean[k]:.1f}" if k in acc else f"{mean[k]:.3g}"
                                                    for k in COLUMNS) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(args.clamps):]))


if __name__ == "__main__":
    main()
