"""``lmedit bench``: run a method over a dataset (a thin layer over :func:`lmedit.bench.run_benchmark`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import (
    DEFAULT_MODEL,
    add_config_args,
    add_judge_args,
    add_protocol_args,
    add_run_option_args,
    config_overrides,
    make_judge,
    protocol_options,
    quiet_libraries,
    run_options,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark a method on a dataset",
                              description="Edit N cases of a dataset and score them; writes cases.jsonl, "
                                          "summary.json and table.md to the output directory.")
    p.add_argument("--method", required=True, help="editing method (see `lmedit methods`)")
    p.add_argument("--dataset", required=True, help="dataset name (see `lmedit data`)")
    p.add_argument("--n", type=int, required=True, help="number of cases")
    p.add_argument("--offset", type=int, default=0, help="skip this many cases first")
    p.add_argument("--setting", choices=("single", "batch", "sequential"), default="single",
                   help="single: edit, score, revert per case; batch: one edit per --batch-size cases; "
                        "sequential: edits accumulate")
    p.add_argument("--batch-size", type=int, default=1, help="requests per edit (batch/sequential settings)")
    p.add_argument("--eval-timing", choices=("immediate", "final"), default="final",
                   help="score each case right after its edit, or after all edits (sequential)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<method>-<dataset>-<setting>-n<N>)")
    p.add_argument("--resume", action="store_true",
                   help="skip cases already in DIR/cases.jsonl (a larger --n extends a single or batch run)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias or model directory (default {DEFAULT_MODEL})")
    p.add_argument("--data", metavar="PATH", help="read the dataset from this file instead of the default")
    add_config_args(p)
    add_run_option_args(p)
    add_protocol_args(p)
    add_judge_args(p)
    p.add_argument("--drift-tokens", type=int, default=20_000,
                   help="batch/sequential: perplexity on this many WikiText-2 tokens and n-gram entropy of "
                        "generations, before and after the edits (default %(default)s; 0: not measured)")
    p.add_argument("--drift-every", type=int, default=0,
                   help="batch: measure drift after every K-th chunk (default 0: the first); sequential: also "
                        "after every K-th chunk (default 0: after the last only)")
    p.add_argument("--checkpoints", metavar="N1,N2,...",
                   help="sequential: after these numbers of edits, score every edit made so far again (retention: "
                        "all, oldest and newest tenth), with locality and drift; e.g. 10,100,1000")
    p.add_argument("--collapse-guard", type=float, metavar="RATIO", default=None,
                   help="sequential: refuse and roll back an edit that pushes a probe perplexity (--guard-tokens "
                        "WikiText-2 tokens) past RATIO x the unedited model's (on by default in sequential runs: 1.3)")
    p.add_argument("--guard-tokens", type=int, metavar="N", default=None,
                   help="sequential: the collapse guard's probe reads this many WikiText-2 tokens (default 128; "
                        "more costs more per edit and bounds drift more tightly)")
    p.add_argument("--guard-windows", type=int, metavar="K", default=None,
                   help="sequential: the probe rotates over K consecutive stretches of --guard-tokens tokens, one "
                        "per edit, each against the unedited model's reading of it (default 16; 1: always the "
                        "first stretch). A resumed run keeps its folder's guard unless a guard option is given")
    p.add_argument("--no-collapse-guard", action="store_true", help="sequential: keep every edit (no guard)")
    p.add_argument("--edit-budget", metavar="DURATION", type=duration,
                   help="sequential: stop starting new edits once editing has taken this long in this sitting "
                        "(e.g. 90m, 2h, 600s), then score the edits made as the run's end; --resume with a new "
                        "budget goes on (scoring is not counted)")
    p.add_argument("--plot", action="store_true",
                   help="with --checkpoints: draw retention and drift against the number of edits to DIR/lifelong.png "
                        "(needs the viz extra: matplotlib)")
    p.add_argument("--editor-checkpoint", metavar="DIR", help="trained editor state, for methods that need training")
    p.set_defaults(func=run)


def default_out(args: argparse.Namespace) -> Path:
    return Path("runs") / f"{args.method}-{args.dataset}-{args.setting}-n{args.n}"


def run(args: argparse.Namespace) -> int:
    from .. import load_model
    from ..bench import run_benchmark
    from ..data import load_dataset
    from ..io import folder_lock
    from ..registry import get_editor

    quiet_libraries(args, quiet_lmedit=True)  # the progress bar shows progress; -v brings the INFO lines back
    if args.n < 1 or args.offset < 0 or args.batch_size < 1:
        raise ValueError("--n and --batch-size must be at least 1 and --offset at least 0")
    overrides = config_overrides(args.method, args.config, args.overrides, args.editor_checkpoint)
    editor = get_editor(args.method, overrides, options=run_options(args))
    # cheap setting checks before the model loads (run_benchmark checks them all again)
    if args.setting == "single" and args.batch_size != 1:
        raise ValueError("--setting single edits one case at a time; use --setting batch or sequential "
                         "with --batch-size")
    if args.batch_size > 1 and not editor.capabilities.batch:
        raise ValueError(f"{args.method} edits one request at a time; use --batch-size 1")
    protocols, generation = protocol_options(args)
    checkpoints, guard = lifelong_options(args)
    if args.edit_budget is not None and args.setting != "sequential":
        raise ValueError("--edit-budget belongs to sequential runs; add --setting sequential or leave it out")
    drift = None
    if args.drift_tokens and args.setting != "single":
        from ..metrics.drift import DriftSettings

        drift = DriftSettings(tokens=args.drift_tokens, every=args.drift_every)
    cases = load_dataset(args.dataset, n=args.n, offset=args.offset, path=args.data)
    if args.setting == "sequential" and len(cases) < args.n:
        raise ValueError(f"the sequence asks for {args.n} edits, but {args.dataset} has only {len(cases)} valid "
                         f"case(s) from offset {args.offset}; lower --n (or --offset)")
    out = Path(args.out) if args.out else default_out(args)
    with folder_lock(out, what=f"run directory {out}"):  # a second run on the same folder stops here, at once
        handle = load_model(args.model)
        run_info = {"command": "lmedit bench", "dataset": args.dataset, "n": args.n, "offset": args.offset,
                    "model": args.model, "data": args.data, "overrides": overrides}
        run_benchmark(editor, handle, cases, setting=args.setting, batch_size=args.batch_size,
                      eval_timing=args.eval_timing, out_dir=out, resume=args.resume, progress=True, run_info=run_info,
                      protocols=protocols, generation=generation, drift=drift, checkpoints=checkpoints,
                      collapse_guard=guard, edit_budget=args.edit_budget)
        judge = make_judge(args, out)
        if judge is not None:
            from ..bench.rescore import rescore_run

            rescore_run(out, judge=judge)
    table = out / "table.md"
    if table.exists():
        print(table.read_text().rstrip())
    if args.plot:
        import json

        from ..table.plots import lifelong_curves

        summary = json.loads((out / "summary.json").read_text())
        print(f"plot: {lifelong_curves(summary, out / 'lifelong.png')}")
    print(f"\nresults: {out}/ (cases.jsonl, summary.json, table.md)")
    return 0


def duration(text: str) -> float:
    """Seconds from ``90m``, ``2h``, ``1.5h``, ``600s`` or a bare number of seconds (argparse type)."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 90m, 2h or 600s") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"the duration must be positive, got {text!r}")
    return value


def lifelong_options(args: argparse.Namespace) -> tuple[list[int] | None, object]:
    """(checkpoints, CollapseGuard or None) from ``--checkpoints``, ``--collapse-guard``, ``--guard-tokens`` and
    ``--no-collapse-guard``;
    checked before anything loads (run_benchmark checks the checkpoints against the cases again)."""
    from ..bench.sequential import CollapseGuard, check_checkpoints

    sequential = args.setting == "sequential"
    windows = getattr(args, "guard_windows", None)
    tuned = args.collapse_guard is not None or args.guard_tokens is not None or windows is not None
    if not sequential and (args.checkpoints or tuned or args.plot):
        raise ValueError("--checkpoints, --collapse-guard, --guard-tokens, --guard-windows and --plot belong to "
                         "sequential runs; add --setting sequential")
    if tuned and args.no_collapse_guard:
        raise ValueError("--collapse-guard / --guard-tokens / --guard-windows and --no-collapse-guard contradict "
                         "each other; keep one")
    if args.plot and not args.checkpoints:
        raise ValueError("--plot draws the checkpoints' curves; add --checkpoints (e.g. 10,50,100)")
    checkpoints = None
    if args.checkpoints:
        try:
            checkpoints = [int(x) for x in args.checkpoints.split(",")]
        except ValueError:
            raise ValueError(f"--checkpoints takes whole numbers separated by commas (e.g. 10,100,1000), got "
                             f"{args.checkpoints!r}") from None
        check_checkpoints(checkpoints, args.n, args.batch_size)
    guard = None
    if sequential and not args.no_collapse_guard:
        given = {"ratio": args.collapse_guard, "tokens": args.guard_tokens, "windows": windows}
        guard = CollapseGuard(**{k: v for k, v in given.items() if v is not None})  # the rest: its defaults
        if not tuned and getattr(args, "resume", False) and getattr(args, "out", None):
            guard = saved_guard(Path(args.out), guard)  # a run made before a default changed still resumes
    return checkpoints, guard


def saved_guard(out: Path, default: object) -> object:
    """The collapse guard a resumed run in ``out`` was made with (None: it ran without one), or ``default``
    where ``out`` holds no run yet."""
    from ..bench.rundir import RUN_FILE
    from ..bench.sequential import guard_of

    try:
        header = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return default
    return guard_of(header) if header.get("setting") == "sequential" else default
