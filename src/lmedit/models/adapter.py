"""ModelAdapter: canonical component names -> Hugging Face module paths (the type only).

Everything in lmedit that touches a model's insides asks its adapter where things are. Adapters are data:
the registered table is ``architectures.py`` (which imports this type), adapters of other models are found
by ``discover.py``, and ``lookup.py`` picks one for a model (:func:`lmedit.models.lookup.adapter_for`).
This module imports neither: the dependency runs one way, from the table and the lookup to the type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..hooks import get_module


class UnsupportedArchitectureError(ValueError):
    """No adapter is registered for a model's architecture class and none could be discovered."""


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
        ffn_layers: the layers that have the FFN named by ``mlp``/``mlp_out`` when not all do (a hybrid
            model whose other layers are recurrent); None = every layer.
        discovered: found from the module structure (``discover.py``), not from the registered table.
        edit_site: what ``mlp_out`` names, the linear map writing into the residual stream that the
            locate-then-edit methods rewrite (its input is their key): ``"ffn"``, the FFN's output projection;
            ``"attn_out"``, the token mixer's output projection, chosen by discovery only for a model none of
            whose blocks has a dense FFN (routed experts only, or no FFN at all). Then ``mlp`` and ``mlp_out``
            both name that projection and ``mlp_in`` is empty: methods that need FFN neurons refuse the model.
        edit_site_reason: why discovery did not edit an FFN (empty for ``"ffn"``).
        residual_streams: how many residual streams the blocks carry between them: 1, or n for hyper-connections
            ([batch, seq, n, d] between blocks, each block reading and writing them through learned mixes).
            Methods that spread a residual target over layers (MEMIT's family) need 1.
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
    ffn_layers: tuple[int, ...] | None = None
    discovered: bool = False
    edit_site: Literal["ffn", "attn_out"] = "ffn"
    edit_site_reason: str = ""
    residual_streams: int = 1

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
        no_ffn = [i for i in layers if self.ffn_layers is not None and int(i) not in self.ffn_layers]
        if no_ffn:
            raise ValueError(f"layer(s) {no_ffn} of this model have no feed-forward block to edit (hybrid "
                             f"layers); the layers with one are {list(self.ffn_layers)}")

    def nearest_ffn_layer(self, layer: int) -> int:
        """``layer`` itself, or the closest layer that has an FFN (hybrid models)."""
        if self.ffn_layers is None or layer in self.ffn_layers:
            return layer
        return min(self.ffn_layers, key=lambda i: (abs(i - layer), i))

    def parts(self) -> dict[str, Any]:
        """Where the parts are (every field but the family name and the provenance): equal parts, same edits."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("family", "discovered", "edit_site_reason")}

    def module(self, model: nn.Module, template: str, i: int | None = None) -> nn.Module:
        """The module at ``template`` (formatted with layer ``i`` when given) inside ``model``."""
        return get_module(model, template.format(i) if i is not None else template)

    @staticmethod
    def has(model: nn.Module, path: str) -> bool:
        """Does the model have a module at ``path``? (A hybrid model's recurrent layers lack some parts.)"""
        try:
            get_module(model, path)
        except LookupError:
            return False
        return True

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
    def per_token(x: torch.Tensor, batch: int) -> torch.Tensor:
        """A [batch, seq, d] view of a module's tensor; some families run their FFN on tokens flattened to
        [batch·seq, d] (OPT, the shared expert of several mixtures of experts). 3-D tensors pass unchanged."""
        return x.view(batch, -1, x.shape[-1]) if x.dim() == 2 else x

    @staticmethod
    def with_hidden(output: Any, h: torch.Tensor) -> Any:
        """Put ``h`` back into the output's structure."""
        if isinstance(output, tuple):
            return (h, *output[1:])
        if isinstance(output, list):
            return [h, *output[1:]]
        return h
