"""Sequential WISE, edit by edit: does every earlier edit still route to the side memory and keep its answer,
and do unrelated prompts stay on the main memory?

After each of N ZsRE edits applied in sequence, prints the shard thresholds and, for every edit so far, the
smallest Δ at its answer positions, the fraction of those positions routed to a side memory and whether the
answer is still the teacher-forced argmax; then the largest Δ and the fraction of tokens on a side memory for
WISE's built-in unrelated sentences and for the ZsRE locality prompts of the N cases.

    python benchmarks/wise_routing.py --n 6 [--set replay=0 ...]
"""

from __future__ import annotations

import argparse

import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--set", action="append", default=[], help="WISE option as key=value")
    args = ap.parse_args()
    options = {k: float(v) if "." in v else int(v) for k, v in (s.split("=", 1) for s in args.set)}
    handle = lmedit.load_model("smollm2-135m")
    cases = load_dataset("zsre", n=args.n)
    editor = lmedit.get_editor("wise", **options)
    locality = [q.prompt for c in cases for q in c.locality]
    for i, case in enumerate(cases):
        edit = editor.compute(handle, case.request).apply(handle)
        layer, stats = get_module(handle.model, edit.path), edit.meta["stats"]
        print(f"== after edit {i}: {stats['steps']} steps, replayed {stats.get('replayed', 0)}, statistic "
              f"{edit.act:.1f}; thresholds {[round(th, 1) for _, th in layer.memories()]}", flush=True)
        for j, c in enumerate(cases[: i + 1]):
            lo, side, _, _, ok = probe(handle, layer, edit.path, c.request.text, c.request.target_new)
            print(f"  edit {j}: Δ at answer ≥ {lo:.1f}, on side memory {side:.2f}, answer argmax {ok}")
        for name, texts in (("unrelated (built in)", IRRELEVANT), ("ZsRE locality", locality)):
            got = [probe(handle, layer, edit.path, t, "x") for t in texts]
            print(f"  {name}: max Δ {max(g[2] for g in got):.1f}, tokens on side memory "
                  f"{sum(g[3] for g in got) / len(got):.3f}", flush=True)


if __name__ == "__main__":
    main()
