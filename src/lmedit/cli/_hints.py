"""What the command line adds to a library error: the flag or command that fixes it (see lmedit.errors)."""

from __future__ import annotations

from typing import Any


def hint(error: BaseException) -> str | None:
    """A line in command-line terms for ``error``'s ``data``, or None when it has nothing to add."""
    data: dict[str, Any] = getattr(error, "data", None) or {}
    lines = []
    train = data.get("train")
    if train:
        method, model = train["method"], train.get("model", "MODEL")
        out = f"runs/{method}"
        lines.append(f"train it with: lmedit train --method {method} --model {model} "
                     f"--dataset {train.get('dataset', 'zsre')} --out {out}; then pass --editor-checkpoint {out} "
                     f"(lmedit table: --checkpoint {method}={out})")
    option = data.get("option")
    if option:
        lines.append(f"on the command line: --{option.replace('_', '-')}")
    return "\n".join(lines) or None
