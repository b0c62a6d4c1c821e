"""Value optimisation of many requests in one batch of rows against one request at a time (SmolLM2-135M).

MEMIT, EMMET, AlphaEdit and PMET optimise one target value z per request before their solve; for a batch of
1,000 facts that is almost all of the edit. The requests' losses are independent, so ``optimize_values`` can
run several requests' rows in one forward and backward (the run option ``row_batch``, formerly
``v_batch_size``) and each still gets its own gradient, Adam state and stopping step. This measures, for the
first N CounterFact requests and MEMIT's SmolLM2 settings, the wall time of all N values at each batch size,
and how far the values and the loss histories move against one at a time.

    python benchmarks/joint_values.py --n 32 --sizes 1 4 8 16      # writes results/joint_values.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

RESULT = Path(__file__).parent / "results" / "joint_values.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="first N CounterFact requests")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16],
                    help="batch sizes; the first is the reference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lmedit
    from lmedit.locate.pipeline import templates_for, value_options
    from lmedit.locate.values import optimize_values
    from lmedit.methods.memit import MEMIT

    handle = lmedit.load_model("smollm2-135m")
    requests = [c.request for c in lmedit.load_dataset(args.dataset, n=args.n)]
    cfg = MEMIT().config_for(handle)
    groups, opts, layer = templates_for(handle, cfg), value_options(cfg), cfg.layers[-1]
    optimize_values(handle, requests[:1], layer, ["layer"], groups, opts)  # warm-up
    rows, ref = [], None
    for size in args.sizes:
        t0 = time.perf_counter()
        got = optimize_values(handle, requests, layer, ["layer"], groups, opts, batch_size=size)
        wall = time.perf_counter() - t0
        if ref is None:
            ref, ref_wall = got, wall
        rel = [float((a.target("layer") - b.target("layer")).norm() / a.target("layer").norm())
               for a, b in zip(ref, got, strict=True)]
        same_steps = sum(len(a.losses) == len(b.losses) for a, b in zip(ref, got, strict=True))
        dloss = max(abs(a.losses[-1] - b.losses[-1]) for a, b in zip(ref, got, strict=True))
        rows.append((size, wall, ref_wall / wall, max(rel), same_steps, dloss))
        print(rows[-1], flush=True)
    steps = [len(v.losses) for v in ref]
    lines = ["# Value optimisation: requests in one batch of rows vs one at a time (SmolLM2-135M)", "",
             f"`python benchmarks/joint_values.py --n {args.n} --sizes {' '.join(map(str, args.sizes))} "
             f"--threads {args.threads}`: the first {args.n} {args.dataset} requests, MEMIT's SmolLM2 value "
             f"settings (layer {layer}, {opts.steps} steps, early stop {opts.early_stop}); Adam steps per request: "
             f"median {statistics.median(steps):g}, min {min(steps)}, max {max(steps)}. All sizes ran in one "
             "process, one after another.", "",
             "| batch size | wall for all values (s) | speed-up vs first row | max ‖Δz‖/‖z‖ | same stopping step "
             "| max Δ final loss |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s} | {w:.1f} | {r:.2f}× | {d:.1e} | {k} / {args.n} | {dl:.1e} |" for s, w, r, d, k, dl in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
