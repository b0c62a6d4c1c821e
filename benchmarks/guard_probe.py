"""Would a longer collapse-guard probe have seen it? Replay a sequential run's kept edits and read the guard's
probe perplexity at several lengths, at a few edit counts.

    python benchmarks/guard_probe.py RUN_DIR [--at 100,300,598] [--tokens 128,512,2048]

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
from lmedit.bench.sequential import CollapseGuard, probe_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--at", default="100,300", help="edit counts (cases of the run, refused ones included)")
    ap.add_argument("--tokens", default="128,512,2048", help="probe lengths")
    args = ap.parse_args()
    at = sorted(int(a) for a in args.at.split(","))
    guards = [CollapseGuard(tokens=int(t)) for t in args.tokens.split(",")]
    handle = lmedit.load_model(json.loads((args.run / "run.json").read_text())["model"]["name"])
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


if __name__ == "__main__":
    main()
