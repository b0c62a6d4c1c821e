"""Neuron-level helpers shared by the FFN editors (knowledge neurons, calibration FFNs, patches).

- ``FFNInfo``: where a layer's FFN is, its width d_ff (read from the output projection's weight, never
  assumed to be 4·d), whether it is gated (SwiGLU-style, two input projections) and its activation.
  The FFN *neuron activation* is the input of the output projection (``adapter.mlp_out``): for a gated
  FFN that is act(gate(x))·up(x), not the gate pre-activation.
- ``SideFFN``: a small FFN of the same family as the model's, with a zero-initialised output projection.
- ``frozen_prefix``: run the layers below a given layer once and replay their outputs, so training loops
  that only change later layers do not recompute the frozen part of the network at every step.
- ``prompt_views`` and ``low_rank_in_param_layout``: small shared utilities.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..hooks import get_module, replayed
from ..swaps import SwapModule
from ..types import EditRequest

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


class UnsupportedFFNError(ValueError):
    """The model's feed-forward block is not one lmedit can find neurons in."""


@dataclass(frozen=True)
class FFNInfo:
    """One layer's FFN as the neuron editors see it.

    Attributes:
        layer: the layer index.
        mlp: path of the whole FFN module (input x = the normalised residual stream, output = FFN(x)).
        out: path of the output projection; its input is the neuron activation a ∈ R^{d_ff}.
        d_model / d_ff: widths read from the output projection's weight ([d_model, d_ff] as out×in).
        gated: two input projections (act(gate x) ⊙ up x), e.g. SwiGLU.
        activation: the activation's name in ``transformers.activations.ACT2FN``.
    """

    layer: int
    mlp: str
    out: str
    d_model: int
    d_ff: int
    gated: bool
    activation: str


def activation_name(model: nn.Module) -> str:
    """The FFN activation named in the model config (the config keys differ between families)."""
    cfg = getattr(model, "config", None)
    for key in ("hidden_act", "activation_function", "dense_act_fn", "hidden_activation", "activation"):
        value = getattr(cfg, key, None)
        if isinstance(value, str) and value:
            return value
    raise UnsupportedFFNError(
        f"cannot tell the FFN activation of {type(model).__name__}: its config has none of hidden_act, "
        "activation_function, dense_act_fn, hidden_activation, activation"
    )


def ffn_info(handle: ModelHandle, layer: int) -> FFNInfo:
    """Describe layer ``layer``'s FFN; clear errors for bad layer indices and unrecognised FFNs."""
    ad = handle.adapter
    ad.check_layers(handle.model, [layer])
    mlp_path, out_path = ad.mlp.format(layer), ad.mlp_out.format(layer)
    if ad.edit_site != "ffn":
        raise UnsupportedFFNError(
            f"{type(handle.model).__name__} has no dense FFN ({ad.edit_site_reason}), so there are no FFN neurons "
            "to edit; ROME, MEMIT or FT edit its attention output projection instead")
    if ad.mlp == ad.mlp_out:
        raise UnsupportedFFNError(
            f"the FFN of {type(handle.model).__name__} is not one module (its linears sit directly in the block, "
            "or in sibling modules), so there is no FFN input and output to wrap; edit its output projection "
            "with ROME, MEMIT or FT instead")
    try:
        mlp = get_module(handle.model, mlp_path)
        if out_path.startswith(mlp_path + "."):  # an installed swap moves the FFN's parts under .base
            inner = mlp_path
            while isinstance(mlp, SwapModule):
                inner, mlp = inner + ".base", mlp.base
            out_path = inner + out_path[len(mlp_path):]
        out = get_module(handle.model, out_path)
    except LookupError as e:
        raise UnsupportedFFNError(f"layer {layer} has no FFN where the adapter says ({e})") from None
    w = getattr(out, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise UnsupportedFFNError(
            f"the FFN output projection {out_path} has no 2-D weight "
            f"({type(out).__name__}); neuron editors need a linear output projection"
        )
    d_model, d_ff = ad.weight_out_in(out).shape
    return FFNInfo(layer, mlp_path, out_path, int(d_model), int(d_ff),
                   gated=len(ad.mlp_in) >= 2, activation=activation_name(handle.model))


def low_rank_in_param_layout(adapter: Any, a_out: torch.Tensor,
                             b_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a, b) of ΔW = a bᵀ in the parameter's own layout, from ΔW_out_in = a_out b_inᵀ."""
    if adapter.weight_layout == "in_out":  # stored [in, out]: ΔWᵀ = b_in a_outᵀ
        return b_in.contiguous(), a_out.contiguous()
    return a_out.contiguous(), b_in.contiguous()


def prompt_views(request: EditRequest, prefixes: list[str] | tuple[str, ...]) -> list[str]:
    """The request prompt, then the same prompt after each prefix (views built from one request)."""
    text = request.text
    views = [text] + [p + text for p in prefixes if p]
    return list(dict.fromkeys(views))


def act_fn(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise UnsupportedFFNError(f"unknown activation {name!r}; known: {sorted(ACT2FN)}")
    return ACT2FN[name]


class SideFFN(nn.Module):
    """FFN_side(x) = W_o · act(W_i x) (or W_o · (act(W_g x) ⊙ W_u x) when gated); no biases.

    W_o starts at zero, so adding the branch changes no output until it is trained.
    """

    def __init__(self, d_model: int, width: int, activation: str, gated: bool, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        std = d_model ** -0.5
        self.w_in = nn.Parameter(torch.randn(width, d_model, generator=g) * std)  # [width, d]
        self.w_up = nn.Parameter(torch.randn(width, d_model, generator=g) * std) if gated else None
        self.w_out = nn.Parameter(torch.zeros(d_model, width))  # [d, width]
        self.act = act_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(x @ self.w_in.T.to(x.dtype))  # [..., width]
        if self.w_up is not None:
            h = h * (x @ self.w_up.T.to(x.dtype))
        return h @ self.w_out.T.to(x.dtype)  # [..., d]


class AddToOutput(SwapModule):
    """Base of swaps that add a branch to a module's output: out = base(x) + branch(x)."""

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base(x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.branch(x).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


# --- frozen prefix replay -------------------------------------------------------------------------------

def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    return x


def _prefix_paths(handle: ModelHandle, first_layer: int) -> list[str]:
    ad = handle.adapter
    paths = []
    if ad.encoder_decoder and ad.encoder_layers:
        container = ad.encoder_layers.split(".{}")[0]
        paths += [ad.encoder_layers.format(i) for i in range(len(get_module(handle.model, container)))]
    return paths + [ad.layer(i) for i in range(first_layer)]


@contextlib.contextmanager
def frozen_prefix(handle: ModelHandle, first_layer: int, inputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, a forward on exactly ``inputs`` only computes layers ≥ ``first_layer``.

    The layers below (and a T5 encoder) run once here; their outputs are recorded and replayed by stand-in
    modules, which are removed on exit whatever happens. Only valid for the same ``inputs`` and
    ``use_cache=False``; the caller must not change anything below ``first_layer`` meanwhile.
    """
    model = handle.model
    paths = _prefix_paths(handle, first_layer)
    records: dict[str, Any] = {}
    hooks = []
    for p in paths:
        def rec(_m: nn.Module, _a: Any, out: Any, p: str = p) -> None:
            records[p] = _detach(out)
        hooks.append(get_module(model, p).register_forward_hook(rec))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    with replayed(model, records):
        yield


@contextlib.contextmanager
def trainable(*modules: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Enable gradients on these modules' own parameters for the block (never a swap's wrapped ``base``)."""
    params = [p for m in modules for n, p in m.named_parameters() if not n.startswith("base.")]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p in params:
            p.requires_grad_(False)


@dataclass
class AnswerBatch:
    """A teacher-forced batch and where its answer tokens are predicted."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor  # [n] batch row of each answer token
    cols: torch.Tensor  # [n] position whose logits predict it
    labels: torch.Tensor  # [n] the answer token ids


def answer_batch(handle: ModelHandle, prompts: list[str], targets: list[str]) -> AnswerBatch:
    """Prompts + answers (right padded) with the (row, position) of every answer-token prediction."""
    batch = handle.tokens.teacher_forced(prompts, targets, side="right")
    rows, cols = [], []
    for r in range(len(prompts)):
        pos = batch.pred_positions(r)
        rows += [r] * len(pos)
        cols += pos
    dev = handle.device
    labels = torch.tensor([y for lab in batch.labels for y in lab], device=dev)
    return AnswerBatch(batch.model_inputs(dev), torch.tensor(rows, device=dev), torch.tensor(cols, device=dev),
                       labels)


@torch.no_grad()
def rows_already_answered(handle: ModelHandle, ab: AnswerBatch) -> list[bool]:
    """Per batch row: does the model (as it is now) already predict every answer token, teacher forced?"""
    hit = answer_logits(handle, ab).argmax(-1) == ab.labels  # [n]
    n_rows = int(ab.inputs["input_ids"].shape[0])
    return [bool(hit[ab.rows == r].all()) for r in range(n_rows)]


def answer_logits(handle: ModelHandle, ab: AnswerBatch) -> torch.Tensor:
    """Logits [n, vocab] (float32) at the answer-token predictions of ``ab``."""
    from ..metrics.scoring import logits_at

    return logits_at(handle, {**ab.inputs, "use_cache": False}, ab.rows, ab.cols).float()
