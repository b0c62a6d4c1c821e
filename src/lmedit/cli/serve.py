"""``lmedit serve``: the playground page and an OpenAI-compatible API over a model you can correct.

    lmedit serve                                   # smollm2-135m on http://127.0.0.1:8000/
    lmedit serve --method ft-m --store runs/my-edits --port 8080
    lmedit serve --host 0.0.0.0 --api-key "$KEY"   # reachable from other machines: a key is required

Edits taught through the page or the API are logged in --store and re-applied when the server restarts.
"""

from __future__ import annotations

import argparse
import os

from ._common import DEFAULT_MODEL, quiet_libraries


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="playground page + OpenAI-compatible API over an editable model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias or model directory (default {DEFAULT_MODEL})")
    p.add_argument("--method", default="rome", help="default editing method of the page and of POST /v1/edits")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--store", default="lmedit-serve", help="folder of the edit log (default ./lmedit-serve)")
    p.add_argument("--api-key", default=os.environ.get("LMEDIT_API_KEY"),
                   help="key every request must carry (required off loopback; default $LMEDIT_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens one answer may ask for")
    p.add_argument("--workers", type=int, default=4, help="answers generated at once (more wait in a queue)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import check_bind, create_app
    except ImportError as e:
        raise RuntimeError(f"lmedit serve needs the serve extra ({e.name} is missing): "
                           "pip install 'lmedit[serve]'") from e
    from .. import load_model
    from ..registry import editor_class
    from ..serve.engine import Engine, Limits
    from ..serve.store import EditStore

    quiet_libraries(args)
    hosts = check_bind(args.host, args.api_key)  # before loading anything
    if editor_class(args.method).capabilities.needs_fit:
        raise ValueError(f"method {args.method!r} needs training; pick one that edits without it (lmedit methods)")
    if not 1 <= args.max_tokens <= 8192 or args.workers < 1:
        raise ValueError("--max-tokens must be 1..8192 and --workers >= 1")
    limits = Limits(max_tokens=args.max_tokens, default_max_tokens=min(128, args.max_tokens),
                    chat_workers=args.workers)
    engine = Engine(load_model(args.model), EditStore(args.store), method=args.method, limits=limits).start()
    print(f"lmedit serve: {engine.handle.name} with {len(engine.applied())} edit(s) from {args.store}; "
          f"open http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}/", flush=True)
    try:
        uvicorn.run(create_app(engine, api_key=args.api_key, allowed_hosts=hosts), host=args.host,
                    port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
