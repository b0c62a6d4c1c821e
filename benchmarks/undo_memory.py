"""What a sequence of weight edits keeps in memory to undo them, against a full copy per edit (SmolLM2-135M).

A weight edit (``WeightDelta``) must put the weights it changed back bit-exactly. Keeping a copy of each
touched weight costs, for AlphaEdit or MEMIT on SmolLM2 (five 576 × 1536 projections), 17.7 MB per edit, so a
1,000-edit sequential run would hold 18 GB of copies. The edit keeps instead the few last-place offsets that
recomputing W − ΔW misses (``lmedit.edits._undo_record``). This applies the saved edits of a sequential
``lmedit bench`` run in order (each as the run applied it: strict, on the weights it was computed on),
measures each edit's undo record against a copy, then reverts them all, newest first, and checks the model is
bit-identical to the unedited one.

    python benchmarks/undo_memory.py runs/alphaedit-zsre-n998 --n 100   # writes results/undo_memory.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import write_report

RESULT = Path(__file__).parent / "results" / "undo_memory.md"


def _bytes(record) -> int:
    if isinstance(record, torch.Tensor):
        return record.numel() * record.element_size()
    if isinstance(record, dict):
        return sum(_bytes(x) for x in record.values())
    return sum(_bytes(x) for x in record) if isinstance(record, tuple | list) else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a sequential lmedit bench run folder (its edits/ are applied)")
    ap.add_argument("--n", type=int, default=100, help="the first N saved edits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lmedit
    from lmedit.edits import Edit

    folders = sorted((p for p in (args.run / "edits").iterdir() if p.is_dir()), key=lambda p: int(p.name))
    folders = folders[: args.n]
    if not folders:
        raise SystemExit(f"{args.run}/edits holds no saved edits")
    edits = [Edit.load(f) for f in folders]
    handle = lmedit.load_model(edits[0].meta.get("model_name") or "smollm2-135m")
    before = handle.state_digest()
    kept, copies, seconds = [], [], []
    for edit in edits:
        t = time.perf_counter()
        edit.apply(handle)
        seconds.append(time.perf_counter() - t)
        records = edit._applied_to[id(handle.model)]
        kept.append(_bytes(records))
        copies.append(sum(handle.model.get_parameter(name).numel() * handle.model.get_parameter(name).element_size()
                          for name in records))
    t = time.perf_counter()
    for edit in reversed(edits):
        edit.revert(handle)
    revert_s = time.perf_counter() - t
    exact = handle.state_digest() == before
    ratio = [k / c for k, c in zip(kept, copies, strict=True)]
    rel = [max(e.meta.get("stats", {}).get("relative_norm", {}).values() or [float("nan")]) for e in edits]
    method = edits[0].meta.get("method", "?")
    lines = [
        "# Undo memory of sequential weight edits", "",
        f"`python benchmarks/undo_memory.py {args.run} --n {args.n}`: the first {len(edits)} saved edits of a "
        f"sequential `{method}` run, applied in order to {handle.name}, then reverted newest first.", "",
        "| | per edit (median) | all edits |",
        "|---|---:|---:|",
        f"| a full copy of the touched weights | {statistics.median(copies) / 2**20:.2f} MiB | "
        f"{sum(copies) / 2**20:.1f} MiB |",
        f"| the undo record kept | {statistics.median(kept) / 2**20:.3f} MiB | {sum(kept) / 2**20:.1f} MiB |",
        f"| record / copy | {statistics.median(ratio):.3f} (max {max(ratio):.3f}) | "
        f"{sum(kept) / sum(copies):.3f} |", "",
        f"Largest ‖ΔW‖/‖W‖ of an edit: median {statistics.median(rel):.3g}, max {max(rel):.3g}. Apply: median "
        f"{statistics.median(seconds):.3f} s per edit (digests and undo record included); reverting all "
        f"{len(edits)}: {revert_s:.1f} s. Bit-identical to the unedited model after the reverts: **{exact}**.",
    ]
    write_report(args.out, lines)
    if not exact:
        raise SystemExit("the reverts did not restore the unedited model bit-exactly")


if __name__ == "__main__":
    main()
