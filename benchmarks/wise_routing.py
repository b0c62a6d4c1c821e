"""Sequential WISE, edit by edit: does every earlier edit still route to the side memory and keep its answer,
and do unrelated prompts stay on the main memory?

After each of N ZsRE edits applied in sequence, prints the shard thresholds and, for every edit so far, the
smallest Δ at its answer positions, the fraction of those positions routed to a side memory and whether the
answer is still the teacher-forced argmax; then the largest Δ and the fraction of tokens on a side memory for
WISE's built-in unrelated sentences and for the ZsRE locality prompts of the N cases.

    python benchmarks/wise_routing.py --n 6 [--set replay=0 ...]
    python benchmarks/wise_routing.py --run RUN_DIR [--at 10,25]

With ``--run``, the edits are not computed but replayed from a sequential ``lmedit bench --method wise --dataset
zsre`` folder (its ``edits/``; refused edits are skipped, as in the run), and the table is printed after the
``--at`` numbers of cases (default: all of them). Each edit's line also gives its rephrasings (the
generalization prompts): the fraction of their answer positions on a side memory, and how many still have the
answer as the argmax. That splits a lost edit into "not routed" and "routed, but the memory no longer holds it".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from _replay import replayed, saved_cases

import lmedit
from lmedit.data import load_dataset
from lmedit.hooks import get_module, trace
from lmedit.methods.wise import IRRELEVANT


@torch.no_grad()
def probe(handle, layer, path: str, prompt: str, answer: str) -> tuple[float, float, float, float, bool]:
    """(min Δ at the answer positions, their fraction on a side memory, max Δ and fraction on a side memory over
    all positions, answer still the argmax) for ``prompt`` + ``answer``."""
    batch = handle.tokens.teacher_forced([prompt], [answer])
    with trace(handle.model, path, input=True, output=True) as t:
        out = handle.model(**batch.model_inputs(handle.device))
    x, main = t.input, layer.base(t.input)
    deltas = torch.stack([delta[0] for _, delta, _ in layer.deltas(x, main)]).max(0).values
    side = layer.route(x, main)[1][0] >= 0
    pos = batch.pred_positions(0)
    ok = out.logits[0, pos].argmax(-1).tolist() == list(batch.labels[0])
    return (float(deltas[pos].min()), float(side[pos].float().mean()), float(deltas.max()),
            float(side.float().mean()), ok)


def computed(args, handle, cases) -> Iterator[tuple[int, object]]:
    """Compute and apply an edit for every case, in order."""
    options = {k: float(v) if "." in v else int(v) for k, v in (s.split("=", 1) for s in args.set)}
    editor = lmedit.get_editor("wise", **options)
    for i, case in enumerate(cases):
        yield i, editor.compute(handle, case.request).apply(handle)


def report(handle, edit, cases, done: list[int], locality: list[str]) -> None:
    layer, stats = get_module(handle.model, edit.path), edit.meta["stats"]
    print(f"== after case {done[-1]}: {stats['steps']} steps, replayed {stats.get('replayed', 0)}, statistic "
          f"{edit.act:.1f}; thresholds {[round(th, 1) for _, th in layer.memories()]}", flush=True)
    kept = []
    for j in done:
        req = cases[j].request
        lo, side, _, _, ok = probe(handle, layer, edit.path, req.text, req.target_new)
        para = [probe(handle, layer, edit.path, q, req.target_new) for q in cases[j].paraphrases]
        line = f"  edit {j}: Δ at answer ≥ {lo:.1f}, on side memory {side:.2f}, answer argmax {ok}"
        if para:
            line += (f"; rephrasings on side memory {sum(p[1] for p in para) / len(para):.2f}, "
                     f"argmax {sum(p[4] for p in para)}/{len(para)}")
        print(line)
        kept.append((side >= 1.0, ok))
    routed = sum(r for r, _ in kept)
    print(f"  edit prompts fully routed {routed}/{len(kept)}; answer kept {sum(o for _, o in kept)}/{len(kept)}; "
          f"routed but lost {sum(r and not o for r, o in kept)}; not routed and lost "
          f"{sum(not r and not o for r, o in kept)}")
    for name, texts in (("unrelated (built in)", IRRELEVANT), ("ZsRE locality", locality)):
        got = [probe(handle, layer, edit.path, t, "x") for t in texts]
        print(f"  {name}: max Δ {max(g[2] for g in got):.1f}, tokens on side memory "
              f"{sum(g[3] for g in got) / len(got):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--set", action="append", default=[], help="WISE option as key=value")
    ap.add_argument("--run", type=Path, help="replay this sequential WISE run's saved edits instead")
    ap.add_argument("--at", default="", help="with --run: numbers of cases to report after (default: the end)")
    args = ap.parse_args()
    if args.run is not None:
        info = json.loads((args.run / "run.json").read_text())
        handle = lmedit.load_model(info["model"]["name"])
        n = saved_cases(args.run)
        cases = load_dataset("zsre", n=max(info["case_ids"][:n]) + 1)
        cases = [cases[i] for i in info["case_ids"][:n]]
        at = {int(a) for a in args.at.split(",") if a} or {n}
        edits = replayed(args.run, handle, min(n, max(at)))
    else:
        handle = lmedit.load_model("smollm2-135m")
        cases = load_dataset("zsre", n=args.n)
        at = set(range(1, args.n + 1))
        edits = computed(args, handle, cases)
    locality = [q.prompt for c in cases for q in c.locality]
    done, last = [], None
    for i, edit in edits:
        if edit is not None:
            done.append(i)
            last = edit
        if i + 1 in at and last is not None:
            report(handle, last, cases, done, locality)


if __name__ == "__main__":
    main()
