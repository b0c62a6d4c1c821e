"""Helpers shared by the subcommands: quiet third-party output, config overrides, small tables."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

from ..metrics.efficiency import human_bytes  # noqa: F401  (re-exported for the CLI modules)

DEFAULT_MODEL = "smollm2-135m"


def quiet_libraries(args: argparse.Namespace, *, quiet_lmedit: bool = False) -> None:
    """Silence transformers' advisory warnings; with ``quiet_lmedit`` also lmedit's INFO lines (unless -v)."""
    if getattr(args, "verbose", 0):
        return
    warnings.filterwarnings("ignore", module=r"transformers(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # transformers is a hard dependency; only an unusual install lands here
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if quiet_lmedit:
        logging.getLogger("lmedit").setLevel(logging.WARNING)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set key=value`` (repeatable) for the editor's Config."""
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file with the editor's config values")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set layers=[4] --set lr=5e-4")


def add_run_option_args(p: argparse.ArgumentParser) -> None:
    """``--value-cache DIR`` and ``--row-batch N``: run options of the editor (lmedit.config.RunOptions),
    not method settings (``--set v_batch_size=N`` / ``value_cache=DIR`` still work, with a deprecation
    warning)."""
    p.add_argument("--value-cache", metavar="DIR",
                   help="locate-then-edit editors: keep the optimised target values here and reuse them for the "
                        "same weights, layer, value settings and request")
    p.add_argument("--row-batch", type=int, metavar="N",
                   help="requests whose values are optimised together (speed only; default 8)")


def run_options(args: argparse.Namespace) -> Any:
    """The editor's RunOptions from ``--value-cache``, ``--row-batch`` and ``--editor-checkpoint``."""
    from ..config import RunOptions

    return RunOptions(value_cache=getattr(args, "value_cache", None), row_batch=getattr(args, "row_batch", None),
                      checkpoint=getattr(args, "editor_checkpoint", None))


def parse_value(text: str) -> Any:
    """A --set value: YAML syntax for lists/numbers/booleans (``[4,5]``, ``true``), else the plain string.

    Strings such as ``1e-3`` stay strings here; the editor's Config coerces them to the field's type.
    """
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_overrides(method: str, config: str | None, sets: list[str],
                     checkpoint: str | None = None) -> dict[str, Any]:
    """Merge ``--config FILE``, ``--set`` values and ``--editor-checkpoint`` into one override dict.

    Unknown keys are rejected by the editor's Config (ConfigError names the known keys).
    """
    from ..registry import editor_class

    cls = editor_class(method)
    overrides: dict[str, Any] = {}
    if config:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config file {config} does not exist")
        overrides.update(cls.Config.from_file(config).to_dict())
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: write it as key=value, e.g. --set lr=5e-4")
        overrides[key.strip()] = parse_value(value)
    if checkpoint is not None:
        if cls.Config.moved.get("checkpoint") != "checkpoint":
            raise ValueError(f"method {cls.name!r} takes no trained checkpoint (its config has no 'checkpoint' "
                             "field); drop --editor-checkpoint")
        overrides["checkpoint"] = checkpoint
    if cls.capabilities.needs_fit and not overrides.get("checkpoint"):
        raise ValueError(f"method {cls.name!r} must be trained before it can edit; pass "
                         "--editor-checkpoint DIR with a trained editor")
    return overrides


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain aligned text table (no third-party formatting)."""
    if not rows:
        return "(none)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)




def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """``--protocols``, ``--context`` and ``--max-new-tokens``: what scores a run, and how answers are generated."""
    p.add_argument("--protocols", default="token_acc,prob_compare,gen",
                   help="scoring protocols, comma-separated (default %(default)s): token_acc = teacher-forced token "
                        "accuracy; prob_compare = CounterFact P(new) > P(true); gen = free generation scored by "
                        "exact match / token F1 / contains (tags gen_em, gen_f1, gen_contains)")
    p.add_argument("--context", choices=("question", "qa", "chat"), default="question",
                   help="gen: the prompt alone (default), with a short QA instruction, or in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="gen: the cap on generated tokens (never depends on the gold answer; default 32)")


def protocol_options(args: argparse.Namespace) -> tuple[tuple[str, ...], Any]:
    """(protocols, GenSettings) from the arguments of :func:`add_protocol_args`; bad values raise."""
    from ..metrics.evaluate import check_protocols
    from ..metrics.generate import GenSettings

    protocols = check_protocols([x.strip() for x in args.protocols.split(",") if x.strip()])
    return protocols, GenSettings(context=args.context, max_new_tokens=args.max_new_tokens)


def add_judge_args(p: argparse.ArgumentParser) -> None:
    """``--judge URL`` and its model and key variable."""
    p.add_argument("--judge", metavar="URL",
                   help="grade generated answers with an LLM judge at this OpenAI-compatible endpoint (e.g. "
                        "https://api.openai.com/v1); tag gen_judge; off by default")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="model name sent to the judge (default %(default)s)")
    p.add_argument("--judge-key-env", default="LMEDIT_JUDGE_KEY",
                   help="environment variable holding the judge's API key (default %(default)s)")


def make_judge(args: argparse.Namespace, folder: Path) -> Any:
    """The Judge the arguments ask for (its verdict cache in ``folder``), or None."""
    if not getattr(args, "judge", None):
        return None
    from ..metrics.judge import Judge

    return Judge(args.judge, model=args.judge_model, key_env=args.judge_key_env, cache=folder / "judge_cache.jsonl")
