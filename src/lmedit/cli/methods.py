"""``lmedit methods``: registered editors with their capabilities; ``--config NAME`` shows one's options."""

from __future__ import annotations

import argparse
import re

from ._common import table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("methods", help="list editing methods, or one method's config fields")
    p.add_argument("--config", metavar="NAME", help="show this method's config fields, defaults and help")
    p.set_defaults(func=run)


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def run(args: argparse.Namespace) -> int:
    from ..registry import editor_class, list_editors

    if args.config:
        cls = editor_class(args.config)
        print(f"{cls.name}: {_summary(cls)}")
        print(f"config class {cls.Config.__name__}; presets: {', '.join(sorted(cls.presets)) or 'none'}\n")
        rows = [{"field": n, "type": re.sub(r"<class '([\w.]+)'>", r"\1", t).replace("typing.", ""),
                 "default": repr(d), "help": h} for n, t, d, h in cls.Config.describe_fields()]
        print(table(rows, ["field", "type", "default", "help"]))
        return 0
    rows = []
    for name in list_editors():
        cls = editor_class(name)
        cap = cls.capabilities
        rows.append({"method": name, "edit": cap.edit_kind.kind, "batch": "yes" if cap.batch else "no",
                     "sequential": "yes" if cap.sequential else "no",
                     "training": "needs fit" if cap.needs_fit else "-",
                     "t5": "yes" if cap.encoder_decoder else "no", "description": _summary(cls)})
    print(table(rows) if rows else "no editing methods are registered")
    print("\n`lmedit methods --config NAME` lists a method's options (set them with --set key=value).")
    return 0
