"""Why a sequential WISE run drifts: replay its saved edits in order and measure, at a few edit counts, how
much ordinary text takes a side memory.

    python benchmarks/wise_drift.py RUN_DIR [--at 10,50,100] [--tokens 2048]

RUN_DIR is a sequential `lmedit bench --method wise` folder (its `edits/`; refused edits are skipped, as in the
run). At each count: the side memories in force and their thresholds θ, then over the first `--tokens` WikiText-2
tokens the fraction of positions whose Δ reaches a θ (they take a side memory), the largest Δ, and the
perplexity with the edits applied against the unedited model's.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from _replay import replayed

import lmedit
from lmedit.hooks import get_module, trace
from lmedit.metrics.drift import DriftSettings, corpus_ids, perplexity


@torch.no_grad()
def routing(handle, path: str, ids: list[int], window: int = 512) -> tuple[float, float]:
    """(fraction of positions on a side memory, largest Δ) over ``ids`` read in windows."""
    layer = get_module(handle.model, path)
    side, total, top = 0, 0, 0.0
    for s in range(0, len(ids), window):
        x_ids = torch.tensor([handle.tokens.bos + ids[s:s + window]], device=handle.device)
        with trace(handle.model, path, input=True) as t:
            handle.model(input_ids=x_ids)
        x, main = t.input, layer.base(t.input)
        choice = layer.route(x, main)[1][0]
        side += int((choice >= 0).sum())
        total += choice.numel()
        top = max([top] + [float(delta.max()) for _, delta, _ in layer.deltas(x, main)])
    return side / total, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--at", default="10,50,100", help="edit counts (cases of the run, refused ones included)")
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    at = sorted(int(a) for a in args.at.split(","))
    run = json.loads((args.run / "run.json").read_text())
    handle = lmedit.load_model(run["model"]["name"])
    ids = corpus_ids(handle, DriftSettings(tokens=args.tokens))
    base = perplexity(handle, ids)
    print(f"unedited perplexity on {len(ids)} tokens: {base:.2f}")
    edits, done, applied, path = replayed(args.run, handle), 0, 0, None
    for target in at:
        for _k, edit in itertools.islice(edits, max(0, target - done)):
            done += 1
            if edit is not None:
                path, applied = edit.path, applied + 1
        if path is None:
            continue
        layer = get_module(handle.model, path)
        frac, top = routing(handle, path, ids)
        thetas = [round(th, 1) for _, th in layer.memories()]
        print(f"after {done} cases ({applied} edits applied): thresholds {thetas}; WikiText tokens on a side memory "
              f"{100 * frac:.1f}%, largest Δ {top:.1f}; perplexity {perplexity(handle, ids):.2f} (unedited {base:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
