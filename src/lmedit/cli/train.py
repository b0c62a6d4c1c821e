"""``lmedit train``: train a trained editor (MEND, KE, SERAC, ...) on a training split, resumably."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ._common import DEFAULT_MODEL, add_config_args, quiet_libraries

DATASETS = {"zsre": "zsre-train", "counterfact": "counterfact-train"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train an editor that needs training (MEND, KE, SERAC)",
        description="Meta-train an editor on the training split of a dataset (never its evaluation file). The last "
                    "--val-size cases are held back for validation; checkpoints are written every val_every "
                    "steps to --out, and --resume continues an interrupted run. Use the result with "
                    "--editor-checkpoint DIR (CLI) or get_editor(method, checkpoint=DIR).")
    p.add_argument("--method", required=True, help="a method whose capabilities say it needs training")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias or model directory (default {DEFAULT_MODEL})")
    p.add_argument("--dataset", default="zsre", choices=sorted(DATASETS), help="training data (default zsre)")
    p.add_argument("--n", type=int, default=None, help="training cases to load (default: the whole split)")
    p.add_argument("--steps", type=int, help="training steps (default: the method's config)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="wall-clock budget; training then stops with a validation and a checkpoint (0: none)")
    p.add_argument("--val-size", type=int, help="cases held back for validation (default: the method's config)")
    p.add_argument("--quick", action="store_true", help="the method's tiny 'quick' budget (seconds; for smoke tests)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<method>-<model>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (e.g. 2 on a shared machine)")
    p.add_argument("--plot", metavar="PNG", help="also save the learning curve to this PNG")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_dataset
    from ..models.loading import load_model
    from ..registry import editor_class, get_editor

    quiet_libraries(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cls = editor_class(args.method)
    if not cls.capabilities.needs_fit:
        raise ValueError(f"method {cls.name!r} needs no training; use it directly with "
                         f"`lmedit edit --method {cls.name}`")
    overrides = _overrides(args)
    if args.val_size is not None:
        overrides["val_size"] = args.val_size
    out = Path(args.out or f"runs/{cls.name}-{Path(args.model).name}-{args.dataset}")
    if out.exists() and any(out.glob("train.json")) and not args.resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    handle = load_model(args.model, device=args.device)
    cases = load_dataset(DATASETS[args.dataset], n=args.n)
    editor = get_editor(cls.name, **overrides)
    print(f"training {cls.name} for {handle.name} on {len(cases)} {DATASETS[args.dataset]} cases -> {out}")
    t0 = time.time()
    result = editor.fit(handle, cases, quick=args.quick, steps=args.steps, out=out, progress=True, resume=args.resume,
                        max_minutes=args.max_minutes)
    print(f"done in {time.time() - t0:.0f} s: {result.steps_done} steps, best validation loss {result.best_val:.4g}"
          f"{' (early stop)' if result.stopped_early else ''}")
    for rec in result.history:
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
    if args.plot:
        from ..training.plot import plot_history

        print(f"learning curve: {plot_history(result.history, args.plot, f'{cls.name} on {handle.name}')}")
    print(f"use it with:  --editor-checkpoint {out}   or   get_editor({cls.name!r}, checkpoint={str(out)!r})")
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    """--config/--set values (the trained editor has no checkpoint yet, so the usual check is skipped)."""
    from ..registry import editor_class
    from ._common import parse_value

    cls = editor_class(args.method)
    overrides = cls.Config.from_file(args.config).to_dict() if args.config else {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: write it as key=value, e.g. --set lr=5e-4")
        overrides[key.strip()] = parse_value(value)
    return overrides
