"""Where a ROME edit's time goes, and what each value-optimisation setting saves (SmolLM2-135M, CPU).

1. Profile of one ROME edit (first case, the preset's settings): the editor's phases (templates, keys,
   statistics, values, solve) and, inside the value optimisation, its one-off setup (the clean pass, the prefix
   key/value cache, the replayed lower layers) against one step's forward (with its key/value-cache copy), loss
   and backward, each the median of ``--profile-steps`` repeats.
2. Variants of the value optimisation (``--variants NAME:key=value,...``, the first is the reference) on the
   first ``--cases`` records of zsre-train, for each editor of ``--methods``: the variants run interleaved
   (case 1 with every variant, then case 2, ...), so load on the shared machine hits them alike; per variant the
   median seconds per edit and per value optimisation, the steps (forward passes) the values took, the final
   value loss, the speed-up against the reference (median of the per-case ratios) and token-accuracy
   reliability / generalization / locality.

    python benchmarks/value_speed.py --cases 10      # writes results/value_speed.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _report import write_report

RESULT = Path(__file__).parent / "results" / "value_speed.md"
METRICS = ("reliability", "generalization", "locality")
DEFAULT_VARIANTS = ["adam:v_optimizer=adam", "lbfgs:v_optimizer=lbfgs"]


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, sets = text.partition(":")
    return name, dict(kv.split("=", 1) for kv in sets.split(",") if kv)


def step_profile(handle, editor, request, repeats: int) -> dict[str, float]:
    """Seconds of the value optimisation's setup and of one step's parts (median of ``repeats``)."""
    import copy

    import torch.nn.functional as F

    from lmedit.locate import values as V
    from lmedit.locate.pipeline import templates_for, value_options
    from lmedit.locate.rows import assemble, request_rows
    from lmedit.locate.suffix import clean_pass, suffix_forward

    cfg = editor.config_for(handle)
    groups, opts, layer = templates_for(handle, cfg), value_options(cfg), cfg.layers[-1]
    t0 = time.perf_counter()
    p = assemble(handle, [request_rows(handle, request, groups)])
    sites = V._Sites(handle, {"mlp": V.site_path(handle.adapter, "mlp", layer)}, p)
    out: dict[str, list[float]] = {"copy of the prefix key/value cache": [], "forward (suffix rows, with graph)": [],
                                   "loss": [], "backward": []}
    try:
        with torch.enable_grad():
            with torch.no_grad():
                logits, _ = clean_pass(handle, p, layer)
            kl_init = F.log_softmax(logits[len(p.labels):], -1)
            suffix, _ = suffix_forward(handle, p, sites, logits, layer)
            setup = time.perf_counter() - t0
            for _ in range(repeats):
                t0 = time.perf_counter()
                copy.deepcopy(suffix.cache)
                t1 = time.perf_counter()
                logits = suffix.logits()
                t2 = time.perf_counter()
                loss, _ = V._losses(p, logits, kl_init, sites, opts)
                t3 = time.perf_counter()
                loss.sum().backward()
                t4 = time.perf_counter()
                out["copy of the prefix key/value cache"].append(t1 - t0)
                out["forward (suffix rows, with graph)"].append(t2 - t1 - (t1 - t0))  # logits() copies the cache
                out["loss"].append(t3 - t2)
                out["backward"].append(t4 - t3)
    finally:
        sites.close()
    return {"setup (clean pass, prefix cache, replay)": setup, **{k: statistics.median(v) for k, v in out.items()},
            "rows": len(p.seqs), "suffix tokens": int(suffix.ids.shape[1])}


def one_edit(handle, editor, case) -> dict:
    from lmedit.metrics.evaluate import evaluate
    from lmedit.metrics.records import TOKEN_ACC

    edit = editor.compute(handle, [case.request])
    stats = edit.meta.get("stats", {})
    (res,) = evaluate(handle, [case], edit, protocols=(TOKEN_ACC,))
    losses = stats.get("value_loss", [])  # ROME: the loss history; the MEMIT family: each request's final loss
    return {"s": edit.meta["compute_seconds"], "phases": stats.get("seconds", {}),
            "steps": len(losses) if editor.name == "rome" else None,
            "loss": losses[-1] if isinstance(losses, list) and losses else float("nan"),
            **{m: 100 * res.post[m].value for m in METRICS if m in res.post}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--methods", default="rome", help="comma-separated locate-then-edit editors")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="NAME:key=value,... (first: reference)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lmedit
    from lmedit import get_editor
    from lmedit.data import load_dataset
    from lmedit.locate.stats import collect_stats

    handle = lmedit.load_model("smollm2-135m")
    collect_stats(handle, [3, 4, 5, 6, 7], tokens=100_000)  # the editors' default statistics, cached once
    cases = load_dataset("zsre-train", n=args.cases)
    variants = [parse_variant(v) for v in args.variants]
    methods = args.methods.split(",")
    ref = get_editor(methods[0], **variants[0][1])
    one_edit(handle, ref, cases[0])  # warm-up: templates, statistics, first-call costs
    profile_edit = one_edit(handle, ref, cases[0])
    profile = step_profile(handle, ref, cases[0].request, args.profile_steps)
    print(profile_edit["phases"], profile, flush=True)
    got: dict[tuple[str, str], list[dict]] = {}
    for case in cases:
        for method in methods:
            for name, sets in variants:
                r = one_edit(handle, get_editor(method, **sets), case)
                got.setdefault((method, name), []).append(r)
                print(method, name, case.case_id, {k: v for k, v in r.items() if k != "phases"}, flush=True)
        write(args, profile_edit, profile, variants, methods, got)  # after every case: a stopped run keeps its rows


def write(args, edit: dict, profile: dict, variants, methods, got) -> None:
    cmd = "python benchmarks/value_speed.py " + " ".join(sys.argv[1:])
    lines = ["# Value optimisation: profile and variants (SmolLM2-135M, CPU)", "",
             f"`{cmd}` on {platform.machine()}, {torch.get_num_threads()} threads (absolute seconds vary with the "
             "machine's load; ratios come from the interleaved runs).", "",
             "## Where one ROME edit's time goes (first case, preset settings)", "",
             "| phase | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in edit["phases"].items()]
    lines += [f"| value optimisation: {edit['steps']} steps | |"]
    lines += [f"| – {k} | {v:.3f} |" for k, v in profile.items() if k not in ("rows", "suffix tokens")]
    lines += ["", f"One step runs {profile['rows']} rows of at most {profile['suffix tokens']} suffix tokens through "
              "the layers from the edit layer up.", ""]
    done = len(got[(methods[-1], variants[-1][0])])
    lines += [f"## Variants on the first {done} zsre-train cases (token accuracy, %)", "",
              "| method | variant | settings | median s / edit | median values s | speed-up (median per-case ratio) "
              "| steps: median (min-max) | mean final value loss | rel | gen | loc |",
              "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for method in methods:
        base = got[(method, variants[0][0])][:done]
        for name, sets in variants:
            rs = got[(method, name)][:done]
            ratio = statistics.median(b["s"] / r["s"] for b, r in zip(base, rs, strict=True))
            steps = [r["steps"] for r in rs if r["steps"] is not None] or [float("nan")]
            vals = [r["phases"].get("values", float("nan")) for r in rs]
            scores = " | ".join(f"{statistics.mean(r[m] for r in rs):.1f}" for m in METRICS)
            lines.append(f"| {method} | {name} | {', '.join(f'{k}={v}' for k, v in sets.items())} | "
                         f"{statistics.median(r['s'] for r in rs):.2f} | {statistics.median(vals):.2f} | "
                         f"{ratio:.2f}× | {statistics.median(steps):g} ({min(steps)}-{max(steps)}) | "
                         f"{statistics.mean(r['loss'] for r in rs):.3f} | {scores} |")
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
