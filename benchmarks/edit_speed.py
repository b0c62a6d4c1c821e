"""Edit speed and quality on SmolLM2-135M: statistics pass, seconds per edit (by phase), ZsRE scores.

1. Second-moment statistics for layers 3-7 over ``--stats-tokens`` WikiText tokens: one pass that captures
   all five layers and stops after layer 7 (``collect_stats``), against five per-layer passes that each stop
   after their own layer (EasyEdit's ``layer_stats`` way), side by side, disk cache off for both.
2. Single edits (stats cached) on the first ``--cases`` records of ``zsre-train`` (zsre_mend_train_1k.json),
   one row per editor of ``--methods`` (default ROME, MEMIT, KN, CaliNet, T-Patcher; batch-capable ones also
   edit all cases at once): median ``compute`` seconds, split into keys / values / solve where reported, and
   reliability / generalization / locality with the token-accuracy protocol
   (edit computed on the unedited model, applied, scored, reverted).

    flock /tmp/lmedit-heavy.lock python benchmarks/edit_speed.py      # writes results/edit_speed.md
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

RESULT = Path(__file__).parent / "results" / "edit_speed.md"
METRICS = ("reliability", "generalization", "locality")
LAYERS = [3, 4, 5, 6, 7]
# EasyEdit on this machine (SmolLM2-135M, ZsRE): ROME 56 s per edit; MEMIT rel/gen/loc with λ = 15000.
EASYEDIT = {"rome_seconds": 56.0, "memit_lambda_15000": (45.8, 34.3, 100.0), "memit_lambda_2100": (95.6, 83.1, 100.0)}


def stats_comparison(handle, tokens: int) -> dict:
    from lmedit.locate.stats import collect_stats

    t0 = time.perf_counter()
    one = collect_stats(handle, LAYERS, tokens=tokens, cache=False)
    t_one = time.perf_counter() - t0
    t_sep, diff = 0.0, 0.0
    for layer in LAYERS:
        t0 = time.perf_counter()
        sep = collect_stats(handle, [layer], tokens=tokens, cache=False)[layer]
        t_sep += time.perf_counter() - t0
        diff = max(diff, float((sep - one[layer]).abs().max() / one[layer].abs().max()))
    return {"tokens": tokens, "one_pass": t_one, "per_layer": t_sep, "speedup": t_sep / t_one, "max_rel_diff": diff}


def run_method(handle, cases, method: str, batch: bool = False, **overrides) -> dict:
    from lmedit import get_editor
    from lmedit.metrics.efficiency import measure
    from lmedit.metrics.evaluate import evaluate
    from lmedit.metrics.records import TOKEN_ACC

    editor = get_editor(method, **overrides)
    seconds, results, norms, phases, extra = [], [], [], {}, []
    groups = [cases] if batch else [[c] for c in cases]
    for group in groups:
        with measure() as m:
            edit = editor.compute(handle, [c.request for c in group])
        seconds.append(edit.meta["compute_seconds"])
        if m.peak_rss_bytes is not None:
            extra.append(m.peak_rss_bytes - m.rss_start_bytes)
        stats = edit.meta.get("stats", {})
        if stats.get("relative_norm"):
            norms.append(max(stats["relative_norm"].values()))
        for name, s in stats.get("seconds", {}).items():
            phases.setdefault(name, []).append(s)
        results += evaluate(handle, group, edit, protocols=(TOKEN_ACC,))
        logging.getLogger("edit_speed").info("%s %s: %.1f s", method, group[0].case_id, seconds[-1])
    scores = {m: 100 * statistics.mean(r.post[m].value for r in results if m in r.post) for m in METRICS}
    return {"method": method, "batch": len(cases) if batch else 1, "median_s": statistics.median(seconds),
            "phases": {k: statistics.median(v) for k, v in phases.items()},
            "max_rel_norm": max(norms) if norms else float("nan"), **scores, "overrides": overrides,
            "extra_rss": max(extra) if extra else None}


def model_bytes(handle) -> int:
    return sum(p.numel() * p.element_size() for p in handle.model.parameters())


def write(stats: dict | None, rows: list[dict], n: int, memory: dict | None = None) -> None:
    lines = ["# Edit speed and quality (SmolLM2-135M, CPU)", "",
             f"`python benchmarks/edit_speed.py` on {platform.machine()} with {torch.get_num_threads()} threads "
             "(shared machine: timings vary with load).", ""]
    if stats:
        lines += ["## Second-moment statistics, layers 3-7", "",
                  "| tokens | one pass, all layers (s) | five per-layer passes (s) | speed-up | max rel. diff |",
                  "|---|---|---|---|---|",
                  f"| {stats['tokens']} | {stats['one_pass']:.1f} | {stats['per_layer']:.1f} | "
                  f"{stats['speedup']:.2f}× | {stats['max_rel_diff']:.1e} |", ""]
    mb = memory["model"] if memory else None
    lines += [f"## Edits: first {n} cases of zsre-train (token accuracy, %)", "",
              "Median seconds of the whole edit, then of its phases where the editor reports them (keys: "
              "template-averaged keys; values: the value optimisation; solve: the closed form; statistics "
              "are cached before the run and cost ~0 here). Edit memory: the largest rise of the process's RSS "
              "above its level when an edit started (the edit's own working memory), as a multiple of the "
              "model's weights" + (f" ({mb / 2**20:.0f} MB; process RSS {memory['before'] / 2**20:.0f} MB before "
                                   f"loading the model, {memory['loaded'] / 2**20:.0f} MB after)" if memory else "")
              + ".", "",
              "| method | batch | median compute s | keys / values / solve s | reliability | generalization | "
              "locality | edit memory (× model) | max ‖ΔW‖/‖W‖ | overrides |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ph = r.get("phases", {})
        split = " / ".join(f"{ph[k]:.2f}" for k in ("keys", "values", "solve")) if "values" in ph else "–"
        mem = f"{r['extra_rss'] / 2**20:.0f} MB ({r['extra_rss'] / mb:.2f}×)" if mb and r.get("extra_rss") is not None \
            else "–"
        lines.append(f"| {r['method']} | {r['batch']} | {r['median_s']:.1f} | {split} | {r['reliability']:.1f} | "
                     f"{r['generalization']:.1f} | {r['locality']:.1f} | {mem} | {r['max_rel_norm']:.3g} | "
                     f"{r['overrides'] or ''} |")
    lines += ["", f"EasyEdit reference on this machine: ROME {EASYEDIT['rome_seconds']:.0f} s per edit; MEMIT "
              f"rel/gen/loc {EASYEDIT['memit_lambda_15000']} with λ=15000 and {EASYEDIT['memit_lambda_2100']} "
              "with λ≈2100 (lmedit's width rule gives 15000·1536/11008 ≈ 2093).", ""]
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--stats-tokens", type=int, default=140_000)
    p.add_argument("--skip-stats", action="store_true", help="skip the statistics comparison")
    p.add_argument("--methods", default="rome,memit,kn,calinet,t-patcher",
                   help="comma-separated editors; batch-capable ones also get a row with all cases in one edit")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("edit_speed").setLevel(logging.INFO)
    torch.set_num_threads(2)
    import lmedit
    from lmedit import get_editor
    from lmedit.data import load_dataset
    from lmedit.locate.stats import collect_stats
    from lmedit.metrics.efficiency import current_rss

    before = current_rss()
    handle = lmedit.load_model("smollm2-135m")
    memory = {"before": before, "loaded": current_rss(), "model": model_bytes(handle)} if before else None
    collect_stats(handle, LAYERS, tokens=100_000)  # the editors' default statistics, cached once
    cases = load_dataset("zsre-train", n=args.cases)
    rows, stats = [], None
    for method in args.methods.split(","):  # edits first; the results file is rewritten after each row
        rows.append(run_method(handle, cases, method))
        print(rows[-1], flush=True)
        if get_editor(method).capabilities.batch:
            rows.append(run_method(handle, cases, method, batch=True))
            print(rows[-1], flush=True)
        if not args.no_write:
            write(stats, rows, args.cases, memory)
    if not args.skip_stats:
        stats = stats_comparison(handle, args.stats_tokens)
        print(stats, flush=True)
    if not args.no_write:
        write(stats, rows, args.cases, memory)

if __name__ == "__main__":
    main()
