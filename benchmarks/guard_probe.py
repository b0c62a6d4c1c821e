"""Would a longer collapse-guard probe have seen it? Replay a sequential run's kept edits and read the guard's
probe perplexity at several lengths, at a few edit counts.

    python benchmarks/guard_probe.py RUN_DIR [--at 100,300,598] [--tokens 128,512,2048]
    python benchmarks/guard_probe.py RUN_DIR --simulate 16 [--at ...]

With ``--simulate K`` it replays the run's kept edits under a *rotating* guard instead (`lmedit bench
--guard-windows K`): edit k is probed on stretch k mod K of K stretches of 128 tokens, against the unedited
model's reading of that stretch, and rolled back past 1.3× there or when the guard's estimate over all K
stretches passes 1.3× (`--window-only`: the first rule alone); at each count it prints how many were kept and
refused and the perplexity on the 2,048 drift tokens (the runs' `--drift-tokens 2048`). Each saved edit was
computed on the model as the run had it; an edit this guard refuses stays out, so the later edits land on a
model somewhat other than the one they were computed for (a replay, not a rerun).

RUN_DIR is a sequential `lmedit bench` folder (its `edits/`; refused edits are skipped, as in the run). The
probe of each length is what `lmedit bench --guard-tokens N` reads (`lmedit.bench.sequential.probe_perplexity`:
the first N tokens of the drift corpus, in windows of up to 512); each is given as a ratio to the unedited
model's, the number the guard compares with its limit (1.3 by default), with the seconds one reading took.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from _replay import replayed

import lmedit
from lmedit.bench.sequential import CollapseGuard, base_perplexities, overall_ratio, probe_perplexity
from lmedit.metrics.drift import DriftSettings, corpus_ids, perplexity

DRIFT_TOKENS = 2048


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--at", default="100,300", help="edit counts (cases of the run, refused ones included)")
    ap.add_argument("--tokens", default="128,512,2048", help="probe lengths")
    ap.add_argument("--simulate", type=int, metavar="K", help="replay under a guard rotating over K windows")
    ap.add_argument("--window-only", action="store_true", help="--simulate without the estimate over all windows")
    args = ap.parse_args()
    at = sorted(int(a) for a in args.at.split(","))
    handle = lmedit.load_model(json.loads((args.run / "run.json").read_text())["model"]["name"])
    if args.simulate:
        simulate(args.run, handle, CollapseGuard(windows=args.simulate), at, estimate=not args.window_only)
        return
    guards = [CollapseGuard(tokens=int(t), windows=1) for t in args.tokens.split(",")]
    base = [probe_perplexity(handle, g) for g in guards]
    print("unedited: " + ", ".join(f"{g.tokens} tokens {b:.2f}" for g, b in zip(guards, base, strict=True)))
    edits, done, applied = replayed(args.run, handle), 0, 0
    for target in at:
        for _k, edit in itertools.islice(edits, max(0, target - done)):
            done, applied = done + 1, applied + (edit is not None)
        cells = []
        for g, b in zip(guards, base, strict=True):
            t0 = time.perf_counter()
            ppl = probe_perplexity(handle, g)
            cells.append(f"{g.tokens} tokens {ppl:.2f} (×{ppl / b:.3f}, {time.perf_counter() - t0:.1f} s)")
        print(f"after {done} cases ({applied} edits applied): " + ", ".join(cells), flush=True)


def simulate(run: Path, handle, guard: CollapseGuard, at: list[int], estimate: bool = True) -> None:
    """The run's kept edits in order under ``guard`` (rotating), with the drift at the counts ``at``; the rule
    of `lmedit.bench.sequential.refuse_if_collapsed`, whose own rollback check cannot be used here (the edits
    land on weights other than those they were computed on)."""
    ids = corpus_ids(handle, DriftSettings(tokens=DRIFT_TOKENS))
    drift0 = perplexity(handle, ids)
    bases = base_perplexities(handle, guard)
    print(f"unedited: {DRIFT_TOKENS} drift tokens {drift0:.2f}; probe windows {min(bases):.2f}–{max(bases):.2f} "
          f"({guard.windows} × {guard.tokens} tokens), limit ×{guard.ratio:g} of each")
    kept = refused = done = 0
    top, first, latest = 0.0, None, [1.0] * guard.windows
    for k, edit in replayed(run, handle, max(at), strict=False):  # a refused edit leaves the next ones' base
        done = k + 1
        if edit is not None:
            w = k % guard.windows
            ratio = probe_perplexity(handle, guard, w) / bases[w]
            est = overall_ratio(latest, w, ratio) if estimate else ratio
            if ratio > guard.ratio or est > guard.ratio:
                edit.revert(handle)
                refused, first = refused + 1, first if first is not None else done
                latest[w] = probe_perplexity(handle, guard, w) / bases[w]  # without the edit, as the guard does
            else:
                kept, top, latest[w] = kept + 1, max(top, ratio), ratio
        if done in at:
            ppl = perplexity(handle, ids)
            print(f"after {done} cases: {kept} kept, {refused} refused by the rotating guard (the first at case "
                  f"{first}; highest kept probe ×{top:.3f}, estimate ×{overall_ratio(latest, 0, latest[0]):.3f}); "
                  f"{DRIFT_TOKENS} drift tokens {ppl:.2f} (×{ppl / drift0:.3f})", flush=True)


if __name__ == "__main__":
    main()
