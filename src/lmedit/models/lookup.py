"""Which adapter a model gets: the registered table for the classes it names, discovery for all others.

``adapter_for(model)``: a class in :data:`architectures.TABLE` (or one registered with
:func:`register_adapter`) gets its adapter exactly as written there; any other model gets one discovered from
its module structure and validated on a short forward pass (``discover.py``), logged once per call. When
discovery fails, the error names the part it could not find and shows how to register an adapter by hand.
"""

from __future__ import annotations

import logging

from torch import nn

from ..hooks import get_module
from .adapter import ModelAdapter, UnsupportedArchitectureError
from .architectures import PRESET_SHAPES, TABLE
from .discover import discover

log = logging.getLogger(__name__)

_ADAPTERS: dict[str, tuple[ModelAdapter, dict[str, ModelAdapter]]] = dict(TABLE)


def register_adapter(architecture: str, adapter: ModelAdapter, **variants: ModelAdapter) -> None:
    """Register the adapter for a Hugging Face architecture class name (e.g. ``"LlamaForCausalLM"``)."""
    _ADAPTERS[architecture] = (adapter, variants)


def supported_architectures() -> list[str]:
    """The classes with a registered adapter (every other decoder-only class is tried by discovery)."""
    return sorted(_ADAPTERS)


def registered_adapter(model: nn.Module) -> ModelAdapter | None:
    """The table's adapter for this model's class, or None when the class is not registered."""
    name = type(model).__name__
    if name not in _ADAPTERS:
        return None
    adapter, variants = _ADAPTERS[name]
    if "gated" in variants:
        try:
            get_module(model, variants["gated"].mlp_in[0].format(0))
            return variants["gated"]
        except LookupError:
            pass
    return adapter


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered adapter of the model's class, else one discovered from its module structure."""
    adapter = registered_adapter(model)
    if adapter is not None:
        return adapter
    if not hasattr(model, "config"):
        raise UnsupportedArchitectureError(
            f"unsupported architecture {type(model).__name__!r}: it is not a Hugging Face model, so its parts "
            "cannot be discovered. Register an adapter for it:\n"
            "    from lmedit.models.lookup import register_adapter\n"
            "    from lmedit.models.adapter import ModelAdapter\n"
            f"    register_adapter({type(model).__name__!r}, ModelAdapter(family=..., embed=..., "
            "layers='...{}', ...))\n(lmedit/models/architectures.py has complete examples)."
        )
    return discover(model)


def preset_name(model: nn.Module, adapter: ModelAdapter | None = None) -> str | None:
    """The name of the tuned preset that fits this architecture's shape, if any (None for discovered ones:
    their editors choose layers from depth and hyperparameters from width)."""
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or getattr(cfg, "num_layers", 0)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", 0)
    family = (adapter or adapter_for(model)).family
    return PRESET_SHAPES.get((family, int(n), int(d)))
