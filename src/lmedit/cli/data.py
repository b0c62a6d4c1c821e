"""``lmedit data``: the datasets lmedit can load, where they were found and how many cases they hold."""

from __future__ import annotations

import argparse

from ._common import table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="list the datasets found and their sizes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import list_datasets

    rows = list_datasets()
    shown = [{"name": r.get("name"), "kind": r.get("kind", ""),
              "records": r["records"] if r.get("records") is not None else "missing",
              "description": r.get("description", "")} for r in rows]
    print("Datasets (use with `lmedit bench --dataset NAME`; --data PATH reads another copy)")
    print(table(shown))
    found = sorted({str(r["where"]) for r in rows if r.get("records") is not None and r.get("where")})
    if found:
        print("\nFiles read:")
        for path in found:
            print(f"  {path}")
    return 0
