"""The ``lmedit`` command line: a thin layer over the library.

Each subcommand lives in its own module here and defines ``register(subparsers)``, which adds its parser
and sets ``func`` (called with the parsed arguments; returns an exit code). Modules are found
automatically, so adding a subcommand is adding one file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from ..errors import LmeditError
from ..types import EditInputError
from ._hints import hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmedit", description="Edit facts in language models and measure the edits.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (LmeditError, EditInputError, ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        if args.verbose > 1:
            raise
        print(f"lmedit {args.command}: error: {e}", file=sys.stderr)
        extra = hint(e)
        if extra:
            print(extra, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
