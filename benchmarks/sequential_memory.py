"""Resident memory of a process making edits one after another, with and without handing the C heap's freed
pages back after each edit (``lmedit.metrics.efficiency.release_freed_memory``, which the sequential bench
runner and ``lmedit serve`` call after every edit).

    python benchmarks/sequential_memory.py --method memit --edits 8 --out benchmarks/results/sequential_memory.md

Each mode runs in its own process (the heap is per process): load SmolLM2, then compute and apply the first
``--edits`` ZsRE requests in sequence, reading after each the RSS and the bytes of all live tensors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tensors_mb() -> float:
    import torch

    return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor)) / 2**20


def child(method: str, edits: int, trim: bool) -> None:
    import torch

    import lmedit
    from lmedit.data import load_dataset
    from lmedit.metrics.efficiency import release_freed_memory

    torch.set_num_threads(1)
    handle = lmedit.load_model("smollm2-135m")
    editor = lmedit.get_editor(method)
    rows = [(0, rss_mb(), tensors_mb())]
    for i, case in enumerate(load_dataset("zsre", n=edits)):
        editor.compute(handle, [case.request]).apply(handle)
        gc.collect()
        if trim:
            release_freed_memory()
        rows.append((i + 1, rss_mb(), tensors_mb()))
    print(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="memit")
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sequential_memory.md"))
    ap.add_argument("--child", choices=["keep", "trim"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.method, args.edits, args.child == "trim")
    runs = {}
    for mode in ("keep", "trim"):
        out = subprocess.run([sys.executable, __file__, "--method", args.method, "--edits", str(args.edits),
                              "--child", mode], check=True, capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    title = f"# Resident memory over {args.edits} sequential {args.method} edits (SmolLM2-135M, CPU, one thread)"
    lines = [title, "",
             f"`python benchmarks/sequential_memory.py --method {args.method} --edits {args.edits}`; MB after each "
             "edit:",
             "", "| edits | RSS, heap kept | RSS, trimmed after each edit | live tensors |", "|---:|---:|---:|---:|"]
    for (n, keep, tensors), (_, trim, _) in zip(runs["keep"], runs["trim"], strict=True):
        lines.append(f"| {n} | {keep:,.0f} | {trim:,.0f} | {tensors:,.1f} |")
    (k0, k1), (t0, t1) = (runs["keep"][1][1], runs["keep"][-1][1]), (runs["trim"][1][1], runs["trim"][-1][1])
    per = max(1, args.edits - 1)
    live = (runs["keep"][-1][2] - runs["keep"][1][2]) / per
    lines += ["", f"From the first edit to the last: RSS {(k1 - k0) / per:+.1f} MB per edit with the heap kept, "
              f"{(t1 - t0) / per:+.1f} MB trimmed; live tensors {live:+.2f} MB per edit."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
