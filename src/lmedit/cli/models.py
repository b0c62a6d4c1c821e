"""``lmedit models``: model aliases (converted or not) and the architectures lmedit can edit."""

from __future__ import annotations

import argparse

from ._common import table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list model aliases and supported architectures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.loading import list_models, lmedit_home
    from ..models.lookup import supported_architectures

    print("Model aliases (use with --model; any local Hugging Face model directory works too)")
    print(table(list_models(), ["alias", "status", "source"]))
    print(f"\nConverted models are cached in {lmedit_home() / 'models'}")
    print("\nRegistered architectures (Hugging Face classes); any other decoder-only causal LM gets an adapter "
          "discovered from its module structure (docs/architectures.md)")
    for name in supported_architectures():
        print(f"  {name}")
    return 0
