"""lmedit: edit the facts inside language models, and measure how well every editing method does it.

    import lmedit
    handle = lmedit.load_model("smollm2-135m")
    req = lmedit.EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
    edit = lmedit.get_editor("rome").compute(handle, [req])   # the model is untouched
    with edit.applied(handle):
        print(handle.generate(req.text))

Importing lmedit loads no method, no model and no data; everything below is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "EditRequest": "lmedit.types",
    "EditCase": "lmedit.types",
    "QA": "lmedit.types",
    "EditInputError": "lmedit.types",
    "Edit": "lmedit.edits",
    "WeightDelta": "lmedit.edits",
    "ModuleSwap": "lmedit.edits",
    "PromptContext": "lmedit.edits",
    "load_model": "lmedit.models.loading",
    "ModelHandle": "lmedit.models.handle",
    "get_editor": "lmedit.registry",
    "list_editors": "lmedit.registry",
    "register_editor": "lmedit.registry",
    "evaluate": "lmedit.metrics.evaluate",
    "load_dataset": "lmedit.data",
    "run_benchmark": "lmedit.bench",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__ + ["__version__"]
