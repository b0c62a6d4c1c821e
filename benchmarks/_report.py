"""Shared by the benchmark scripts: write a Markdown report and echo it."""

from __future__ import annotations

from pathlib import Path


def write_report(path: str | Path, lines: list[str]) -> str:
    """Join ``lines`` into ``path`` (folders created) and print the text; returns it."""
    text = "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)
    return text
