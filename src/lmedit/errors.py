"""The base of lmedit's typed errors.

An error's message says what to fix in the library's own terms (argument names, Python calls); its
``data`` holds the facts behind it (the method, the model, the argument at fault) so that a front end says
the same thing in its terms: the command line turns ``data["option"]`` into its flag and ``data["train"]``
into the ``lmedit train`` command (``lmedit.cli._hints``). The library never writes command-line flags.
"""

from __future__ import annotations

from typing import Any


class LmeditError(Exception):
    """An error lmedit raises on purpose, with the facts a front end needs in ``data``.

    Conventional keys of ``data``: ``option`` (the keyword argument or config field to change), ``train``
    (a dict with ``method``, ``model`` and ``dataset`` when an editor must be trained first).
    """

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.data: dict[str, Any] = data


# --- edits (lmedit.edits) ----------------------------------------------------------------------------
class EditError(RuntimeError):
    """An edit that cannot be applied or reverted as asked; the model is left as it was."""


class EditMismatchError(EditError):
    """An edit made for other weights (another model, or other base values) than the ones given."""


class EditOrderError(EditError):
    """A revert asked for an edit that has later edits applied on top of it; the model is left as it was."""


class EditDivergedError(LmeditError, EditError):
    """An update far larger than the weights it changes (a diverged optimisation); nothing was written.
    ``data["option"]`` names the bound."""


class EditCollapseError(LmeditError, EditError):
    """An edit the collapse guard refused and rolled back (it pushed the probe perplexity past the limit);
    ``data`` holds ``perplexity`` and ``limit``."""


class EditFileError(EditError):
    """A saved edit that is corrupt, altered, malformed, of an older format, or names an unknown module."""
