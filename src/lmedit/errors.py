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
