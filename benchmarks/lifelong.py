"""Lifelong editing on SmolLM2-135M: N sequential ZsRE edits per method, every edit so far scored at checkpoints.

For each method of ``--methods`` (memory editors first; MEMIT as the weight-editing baseline): edits 1..N of
the ZsRE eval records are computed on the model as it is (all earlier edits applied) and applied one by one.
At every checkpoint k, all k edits made so far are scored on the final model of that moment (the
retention/"final" timing of methods-spec A.3) with the token-accuracy protocol of ``lmedit.metrics``:
reliability (edit prompt), generalization (rephrase) and locality (agreement with the unedited model on the
NQ question, computed once before any edit); "oldest" and "newest" are the first and the last tenth of the
edits (retention). Perplexity drift: WikiText-2 test, the first ``--ppl-chunks`` chunks of 256 tokens,
against the unedited model. At the end the oldest edit is deleted while the others stay applied (memory
editors: its entries leave the memory; the check compares the model with one that never had it) and the
per-edit cost gives the projection to 1,000 edits.

    flock /tmp/lmedit-heavy.lock python benchmarks/lifelong.py --n 100 --checkpoints 10,50,100
    python benchmarks/lifelong.py --methods kv-memory --set 'kv-memory.context_lengths=[]' --out /tmp/kv-fast.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from _report import write_report

from lmedit.data import load_dataset
from lmedit.metrics.evaluate import Baseline, baseline, score_cases
from lmedit.metrics.records import TOKEN_ACC
from lmedit.models.loading import load_model
from lmedit.registry import get_editor

RESULT = Path(__file__).parent / "results" / "lifelong.md"
METRICS = ("reliability", "generalization", "locality")
CORPUS = Path("/work/shared/data/corpus/wikitext-2_test.tokens.txt")


@torch.no_grad()
def perplexity(handle, chunks: list[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    for ids in chunks:
        out = handle.model(input_ids=ids[None].to(handle.device), labels=ids[None].to(handle.device))
        nll += float(out.loss) * (len(ids) - 1)
        n += len(ids) - 1
    return math.exp(nll / n)


def text_chunks(handle, path: Path, n: int, length: int = 256) -> list[torch.Tensor]:
    text = " ".join(line.strip() for line in path.read_text().splitlines()[:400] if line.strip())
    ids = handle.tokenizer(text)["input_ids"]
    return [torch.tensor(ids[i * length : (i + 1) * length]) for i in range(n)]


def scores(handle, cases, base: Baseline, k: int) -> dict[str, float]:
    sub = Baseline(locality=base.locality[:k], pre=base.pre[:k])
    post = score_cases(handle, cases[:k], sub, protocols=[TOKEN_ACC])
    out = {m: 100 * statistics.mean(p[m].value for p in post if m in p) for m in METRICS}
    tenth = max(1, k // 10)
    out["oldest"] = 100 * statistics.mean(p["reliability"].value for p in post[:tenth])
    out["newest"] = 100 * statistics.mean(p["reliability"].value for p in post[-tenth:])
    return out


def run(method: str, n: int, checkpoints: list[int], ppl_chunks: int, overrides: dict) -> dict:
    handle = load_model("smollm2-135m")
    cases = load_dataset("zsre", n=n)
    editor = get_editor(method, **overrides)
    chunks = text_chunks(handle, CORPUS, ppl_chunks)
    base = baseline(handle, cases, protocols=[TOKEN_ACC])
    ppl0 = perplexity(handle, chunks)
    rows, edits, seconds, cpu = [], [], [], []
    t_start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        t0, c0 = time.perf_counter(), time.process_time()
        edits.append(editor.compute(handle, [case.request]).apply(handle))
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i in checkpoints:
            s = scores(handle, cases, base, i)
            s.update(k=i, ppl=perplexity(handle, chunks), per_edit=statistics.median(seconds),
                     cpu_per_edit=statistics.median(cpu))
            rows.append(s)
            logging.info("%s after %d edits: %s", method, i, {k: round(v, 1) for k, v in s.items()})
    wall = time.perf_counter() - t_start
    undo = delete_oldest(handle, cases, edits, base, method)
    for e in reversed(edits):
        if e.is_applied(handle):
            e.revert(handle)
    return {"method": method, "rows": rows, "ppl0": ppl0, "seconds": seconds, "cpu": cpu, "wall": wall, "undo": undo,
            "overrides": overrides}


def delete_oldest(handle, cases, edits, base: Baseline, method: str) -> dict:
    """Delete edit 1 while edits 2..N stay applied (memory editors only: weight edits revert last-in-first-out)."""
    if not getattr(edits[0], "order_free", False):
        return {}
    t0 = time.perf_counter()
    edits[0].revert(handle)
    dt = time.perf_counter() - t0
    post = score_cases(handle, cases[:1], Baseline(locality=base.locality[:1], pre=base.pre[:1]),
                       protocols=[TOKEN_ACC])[0]
    rest = scores(handle, cases, base, len(edits))  # case 1 now scored against its own deleted edit
    return {"seconds": dt, "reliability_deleted": 100 * post["reliability"].value,
            "reliability_pre": 100 * base.pre[0]["reliability"].value,
            "reliability_all": rest["reliability"]}


def report(results: list[dict], n: int) -> list[str]:
    lines = [
        "# Lifelong editing on SmolLM2-135M (ZsRE, sequential)", "",
        f"`python benchmarks/lifelong.py --n {n}` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), on a machine shared with other jobs (wall "
        "seconds vary with its load; CPU seconds of this process are the cost on one core). Edits 1..k are "
        "applied in order to one model; at each checkpoint all k are scored on that model (retention timing, "
        "teacher-forced token accuracy); locality against the unedited model; perplexity on 256-token "
        "WikiText-2 test chunks. Oldest/newest: reliability of the first/last tenth of the edits.", "",
        "| method | edits | reliability | generalization | locality | oldest | newest | perplexity (unedited) | "
        "s/edit (median) | CPU s/edit (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        label = r["method"] + "".join(f" {k}={json.dumps(v)}" for k, v in r["overrides"].items())
        for row in r["rows"]:
            lines.append(f"| {label} | {row['k']} | {row['reliability']:.1f} | {row['generalization']:.1f} | "
                         f"{row['locality']:.1f} | {row['oldest']:.1f} | {row['newest']:.1f} | "
                         f"{row['ppl']:.2f} ({r['ppl0']:.2f}) | {row['per_edit']:.2f} | {row['cpu_per_edit']:.2f} |")
    lines += ["", "## Cost and projection to 1,000 edits", ""]
    for r in results:
        s, c = r["seconds"], r["cpu"]
        first, last = statistics.mean(c[: max(1, len(c) // 10)]), statistics.mean(c[-max(1, len(c) // 10):])
        lines.append(f"- **{r['method']}** ({r['overrides'] or 'preset'}): {len(s)} edits in {r['wall']:.0f} s wall "
                     f"including checkpoint scoring; compute+apply median {statistics.median(s):.2f} s/edit wall, "
                     f"{statistics.median(c):.2f} CPU s/edit on one thread (first tenth {first:.2f}, last tenth "
                     f"{last:.2f}) → 1,000 edits ≈ {1000 * statistics.median(c) / 60:.0f} min of one core.")
        u = r["undo"]
        if u:
            lines.append(f"  Deleting edit 1 with {len(s) - 1} newer edits applied took {1000 * u['seconds']:.1f} ms; "
                         f"its reliability went back to {u['reliability_deleted']:.1f} (unedited "
                         f"{u['reliability_pre']:.1f}); reliability over all {len(s)} cases then "
                         f"{u['reliability_all']:.1f}.")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="kv-memory,grace,memit")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--checkpoints", default="", help="comma-separated edit counts (default: 10%%, 50%%, 100%%)")
    ap.add_argument("--n-memit", type=int, default=None, help="edits for MEMIT (default: --n)")
    ap.add_argument("--ppl-chunks", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=JSON",
                    help="config override of one method, e.g. kv-memory.context_lengths=[]")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    overrides: dict[str, dict] = {}
    for item in args.set:
        target, _, value = item.partition("=")
        method, _, key = target.partition(".")
        overrides.setdefault(method, {})[key] = json.loads(value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("lmedit", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    results = []
    for method in args.methods.split(","):
        n = args.n_memit if method == "memit" and args.n_memit else args.n
        cps = sorted({int(x) for x in args.checkpoints.split(",") if x and int(x) <= n} | {n}) \
            if args.checkpoints else sorted({max(1, n // 10), max(1, n // 2), n})
        results.append(run(method, n, cps, args.ppl_chunks, overrides.get(method, {})))
        write_report(args.out, report(results, args.n))


if __name__ == "__main__":
    main()
