"""``lmedit table``: the paper's Table 1 in one command (a thin layer over :func:`lmedit.table.build_table`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ._common import DEFAULT_MODEL, add_judge_args, add_protocol_args, make_judge, protocol_options, quiet_libraries


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "table", help="regenerate the paper's Table 1 (every method x dataset)",
        description="Benchmark every (method, dataset) cell and write table1.md/.csv/.json, efficiency.md, "
                    "table1.png and efficiency.png. Cells are cached under OUT/cells: a rerun computes only "
                    "missing or stale cells, and an interrupted cell resumes its finished cases.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias or model directory (default {DEFAULT_MODEL})")
    p.add_argument("--methods", default="paper",
                   help="'paper' (the paper's ten methods, default), 'all' (every registered editor) or m1,m2")
    p.add_argument("--datasets", default="zsre,counterfact,qaedit,zsre-portability,mquake",
                   help="comma-separated dataset names (default: %(default)s)")
    p.add_argument("--n", type=int, default=100, help="cases per dataset (default 100; 20 for a quick look)")
    p.add_argument("--multihop-n", type=int,
                   help="cases of a multi-hop dataset (mquake); default N/4, as each case applies 4 edits")
    p.add_argument("--offset", type=int, default=0, help="skip this many valid records of each dataset first")
    p.add_argument("--setting", choices=("single", "sequential"), default="single",
                   help="single: each case edited alone then reverted; sequential: edits accumulate")
    p.add_argument("--edits", type=int, default=100, help="sequential: edits stacked per sequence (T)")
    p.add_argument("--eval-timing", choices=("final", "immediate"), default="final",
                   help="sequential: score after all T edits (final) or right after each edit (immediate)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per edit for methods that batch")
    p.add_argument("--out", default="results/table1", help="output folder (default %(default)s)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="where cells run")
    p.add_argument("--address", help="ray: address of an existing cluster (default: start a local one)")
    p.add_argument("--workers", type=_workers, default="auto",
                   help="local: worker processes that take whole cells (default auto: one per CPU core, at most "
                        "4; 1 on a GPU; 1 = this process); ray: actors and CPUs of the local cluster (default 2)")
    p.add_argument("--threads", type=int,
                   help="torch threads per process (default: torch's in one process, the cores shared out among "
                        "local workers, 1 per ray worker)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed set at the start of every cell")
    p.add_argument("--checkpoint", action="append", default=[], metavar="METHOD[@DATASET]=DIR",
                   help="trained editor (an `lmedit train --out` folder) for a method that needs training; "
                        "METHOD@DATASET=DIR for that dataset's cells only (e.g. mend@counterfact=runs/mend-cf); "
                        "default runs/METHOD when it exists (repeatable)")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="an `lmedit bench` output folder, or a folder of them: a cell takes the finished cases of "
                        "a run there with the same method, config, model and setting instead of recomputing "
                        "them (repeatable)")
    p.add_argument("--cached-only", action="store_true",
                   help="compute nothing: lay out the finished cells, '-' for the others (e.g. while a run goes on)")
    p.add_argument("--data", metavar="PATH", help="data folder to read the datasets from")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    add_protocol_args(p)
    add_judge_args(p)
    p.add_argument("--drift-tokens", type=int, default=20_000,
                   help="batch (--batch-size > 1) and sequential cells: perplexity on this many WikiText-2 tokens "
                        "before and after the edits, shown as a 'Perplexity drift' ratio row per dataset (default "
                        "%(default)s; 0: not measured)")
    p.set_defaults(func=run)


class BarProgress:
    """Progress bars: one over cells (the current cell's name, the table's ETA); the bar over the current
    cell's cases with its ETA is drawn by run_benchmark."""

    def __init__(self, n_cells: int, inner_bars: bool) -> None:
        from tqdm import tqdm

        self.inner_bars = inner_bars
        self.cells = tqdm(total=n_cells, desc="cells", unit="cell", position=0, file=sys.stderr)

    def cell_started(self, spec: Any, n_cases: int) -> None:
        self.cells.set_postfix_str(spec.name)

    def cell_done(self, result: Any) -> None:
        state = "cached" if result.cached else result.status
        self.cells.set_postfix_str(f"{result.spec.name}: {state}")
        self.cells.update(1)

    def status(self, text: str) -> None:
        self.cells.set_postfix_str(text)

    def close(self) -> None:
        self.cells.close()


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--workers takes a positive number or 'auto', not {text!r}")
    return n


def _checkpoints(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        method, sep, path = item.partition("=")
        if not sep or not method.strip() or not path.strip():
            raise ValueError(f"--checkpoint {item!r}: write it as METHOD=DIR or METHOD@DATASET=DIR, e.g. "
                             "--checkpoint mend=ckpt/mend")
        out[method.strip()] = path.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from ..table import build_table, check_datasets, resolve_methods

    quiet_libraries(args, quiet_lmedit=True)
    if not args.verbose:  # its INFO lines would break the progress bars
        logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    # bad names fail here, before the model loads or a bar is drawn
    datasets = check_datasets([d.strip() for d in args.datasets.split(",") if d.strip()])
    names, unavailable = resolve_methods(args.methods)  # fail on unknown methods before loading anything
    protocols, generation = protocol_options(args)
    if args.backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            print("lmedit table: error: --backend ray needs Ray (pip install ray); or use --backend local",
                  file=sys.stderr)
            return 1
    if args.drift_tokens < 0:
        raise ValueError("--drift-tokens must be 0 (off) or a positive number of tokens")
    drift = None
    if args.drift_tokens and (args.setting == "sequential" or args.batch_size > 1):
        from ..metrics.drift import DriftSettings

        drift = DriftSettings(tokens=args.drift_tokens)
    judge = make_judge(args, Path(args.out))
    n_cells = (len(names) - len(unavailable)) * len(datasets)
    progress = BarProgress(n_cells, inner_bars=args.backend == "local") if not args.quiet else None
    t0 = time.time()
    try:
        result = build_table(
            args.model, methods=args.methods, datasets=datasets, n=args.n, multihop_n=args.multihop_n,
            offset=args.offset, setting=args.setting, edits=args.edits, eval_timing=args.eval_timing,
            batch_size=args.batch_size,
            out=args.out, backend=args.backend, address=args.address, workers=args.workers, seed=args.seed,
            checkpoints=_checkpoints(args.checkpoint), data_path=args.data, threads=args.threads,
            plots=not args.no_plots, progress=progress, reuse=args.reuse,
            cached_only=args.cached_only, protocols=protocols, generation=generation, drift=drift, judge=judge)
    finally:
        if progress:
            progress.close()
    print(result.markdown.rstrip())
    down = (result.meta.get("judge") or {}).get("down")
    if down:
        print(f"\nwarning: the LLM judge was unreachable ({down}); the table has no gen_judge rows for the cells it "
              "could not grade, and its other numbers stand", file=sys.stderr)
    cached = sum(c.cached for c in result.cells)
    print(f"\n{len(result.cells)} cells ({cached} from cache) in {time.time() - t0:.0f} s; wrote "
          + ", ".join(str(p) for p in result.files.values()))
    return 0
