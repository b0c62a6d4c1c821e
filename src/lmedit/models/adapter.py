"""ModelAdapter: canonical component names -> Hugging Face module paths, chosen by architecture class.

Everything in lmedit that touches a model's insides asks its adapter where things are. Adapters are data
(see ``architectures.py``); a new architecture is one :func:`register_adapter` call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..hooks import get_module


class UnsupportedArchitectureError(ValueError):
    """No adapter is registered for a model's architecture class."""


@dataclass(frozen=True)
class ModelAdapter:
    """Where a model family keeps its parts. Templates take the layer index in ``{}``.

    Attributes:
        family: short family name (``llama``, ``gpt2``, ...).
        embed: token embedding module.
        layers: one transformer block (decoder block for encoder-decoder models).
        attn / attn_out: attention module / its output projection.
        mlp: the feed-forward module; mlp_in: its input projection(s); mlp_out: its output projection,
            whose input is the key k and output the value v of locate-then-edit methods.
        ln_final: the final norm before the unembedding; lm_head: the unembedding module (the same
            Parameter as ``embed`` when embeddings are tied).
        weight_layout: ``"out_in"`` (nn.Linear) or ``"in_out"`` (GPT-2 Conv1D) -- stated, never guessed.
        encoder_decoder: True for T5-style models; encoder_layers/encoder_mlp_out name the encoder side.
    """

    family: str
    embed: str
    layers: str
    attn: str
    attn_out: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    ln_final: str
    lm_head: str
    weight_layout: Literal["out_in", "in_out"] = "out_in"
    encoder_decoder: bool = False
    encoder_layers: str | None = None
    encoder_mlp_out: str | None = None

    def replace(self, **kw: Any) -> ModelAdapter:
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **kw)

    # --- paths -------------------------------------------------------------------------------------
    def layer(self, i: int) -> str:
        """The module path of layer ``i``."""
        return self.layers.format(i)

    def layer_container(self) -> str:
        """The module path of the list that holds the layers."""
        return self.layers.split(".{}")[0]

    def n_layers(self, model: nn.Module) -> int:
        """How many layers ``model`` has."""
        return len(get_module(model, self.layer_container()))

    def check_layers(self, model: nn.Module, layers: list[int] | tuple[int, ...]) -> None:
        """Raise ValueError naming the valid range when a layer index is outside the model."""
        n = self.n_layers(model)
        bad = [i for i in layers if not (0 <= int(i) < n)]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range: this model has {n} layers (0..{n - 1})")

    def module(self, model: nn.Module, template: str, i: int | None = None) -> nn.Module:
        """The module at ``template`` (formatted with layer ``i`` when given) inside ``model``."""
        return get_module(model, template.format(i) if i is not None else template)

    # --- weights -----------------------------------------------------------------------------------
    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        """The module's weight as [out, in] (a view; transposed for Conv1D)."""
        w = module.weight
        return w.T if self.weight_layout == "in_out" else w

    def to_param_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Turn an [out, in] update into the layout the parameter is stored in."""
        return delta_out_in.T.contiguous() if self.weight_layout == "in_out" else delta_out_in

    def unembedding(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_U [vocab, d] and its bias. Works for tied embeddings (no ``lm_head.weight`` parameter)."""
        try:
            head = get_module(model, self.lm_head)
        except LookupError:
            # renamed across transformers versions (GPT-NeoX: embed_out in 4.x, lm_head in 5.x)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None:
                raise
        return head.weight, getattr(head, "bias", None)

    # --- outputs -----------------------------------------------------------------------------------
    @staticmethod
    def hidden(output: Any) -> torch.Tensor:
        """The hidden-state tensor of a block/module output (tuple in older transformers)."""
        return output[0] if isinstance(output, tuple | list) else output

    @staticmethod
    def with_hidden(output: Any, h: torch.Tensor) -> Any:
        """Put ``h`` back into the output's structure."""
        if isinstance(output, tuple):
            return (h, *output[1:])
        if isinstance(output, list):
            return [h, *output[1:]]
        return h


_ADAPTERS: dict[str, tuple[ModelAdapter, dict[str, ModelAdapter]]] = {}


def register_adapter(architecture: str, adapter: ModelAdapter, **variants: ModelAdapter) -> None:
    """Register the adapter for a Hugging Face architecture class name (e.g. ``"LlamaForCausalLM"``)."""
    _ADAPTERS[architecture] = (adapter, variants)


def supported_architectures() -> list[str]:
    """The Hugging Face architecture class names that have an adapter, sorted."""
    _load_table()
    return sorted(_ADAPTERS)


def _load_table() -> None:
    from . import architectures  # noqa: F401  (registers the built-in table)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, by its architecture class; a clear error when there is none."""
    _load_table()
    name = type(model).__name__
    if name not in _ADAPTERS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {name!r}. lmedit supports {sorted(_ADAPTERS)}. To add it, describe "
            "where its parts are and register it:\n"
            "    from lmedit.models.adapter import ModelAdapter, register_adapter\n"
            f"    register_adapter({name!r}, ModelAdapter(family=..., embed=..., layers='...{{}}', ...))\n"
            "(see lmedit/models/architectures.py for complete examples)."
        )
    adapter, variants = _ADAPTERS[name]
    if "gated" in variants:
        try:
            get_module(model, variants["gated"].mlp_in[0].format(0))
            return variants["gated"]
        except LookupError:
            pass
    return adapter


def preset_name(model: nn.Module) -> str | None:
    """The name of the tuned preset that fits this architecture's shape, if any."""
    from .architectures import PRESET_SHAPES

    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or getattr(cfg, "num_layers", 0)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", 0)
    family = adapter_for(model).family
    return PRESET_SHAPES.get((family, int(n), int(d)))
