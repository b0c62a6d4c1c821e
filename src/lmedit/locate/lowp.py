"""bfloat16 matrix products for a value optimisation's steps (``v_matmuls="bf16"``).

A value step is a forward and backward of a few rows through every layer above the edit site and the
unembedding; on a CPU nearly all of it is the linear layers' matrix products (about 80% of a SmolLM2 ROME
edit), and with AVX-512 BF16 a bfloat16 product of these shapes runs 2.1-2.5× faster than float32
(``benchmarks/results/matmul_dtypes.md``; a whole ROME edit 1.44×, ``benchmarks/results/value_speed_bf16.md``).
:class:`Bf16Linears` gives every ``nn.Linear`` of layers ℓ.. and the unembedding a bfloat16 copy of its
weight, made once per optimisation: inputs are rounded to bfloat16, the product accumulates in float32 inside
the kernel, and its output goes back to the input's dtype, so norms, attention, the loss and δ itself stay
float32. The model's own parameters are never written; the copies are dropped on exit. ``enabled = False``
runs a pass on the model's own weights: the value optimisation confirms at the model's precision that a
value's loss is below the early stop before it stops (:mod:`lmedit.locate.values`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import get_module

MATMULS = ("model", "bf16")  # the model's own dtype (no copies), or bfloat16 copies for the steps


class Bf16Linears:
    """While entered, ``modules`` (linear layers) multiply in bfloat16 from copies of their weights."""

    def __init__(self, modules: list[nn.Linear]) -> None:
        self.modules = modules
        self.enabled = True
        self._patched: list[nn.Linear] = []

    def __enter__(self) -> Bf16Linears:
        try:
            for m in self.modules:
                if "forward" in m.__dict__:  # someone else's stand-in forward: leave that module alone
                    continue
                weight = m.weight.detach().to(torch.bfloat16)
                bias = None if m.bias is None else m.bias.detach().to(torch.bfloat16)
                m.forward = self._forward(m, weight, bias)
                self._patched.append(m)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched = []

    def _forward(self, module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None):
        own = type(module).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not self.enabled or x.dtype != torch.float32:
                return own(module, x)
            return F.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)

        return forward


def low_precision(handle, layer: int, head: nn.Module | None, matmuls: str) -> Bf16Linears | None:
    """The :class:`Bf16Linears` of layers ``layer``.. and ``head`` for ``matmuls="bf16"`` on a float32 model;
    None when there is nothing to do (``"model"``, or a model already in a 16-bit dtype)."""
    if matmuls not in MATMULS:
        raise ValueError(f"unknown v_matmuls {matmuls!r}; use one of {list(MATMULS)}")
    if matmuls == "model" or handle.dtype != torch.float32:
        return None
    mods = [m for i in range(layer, handle.n_layers)
            for m in get_module(handle.model, handle.adapter.layer(i)).modules() if type(m) is nn.Linear]
    if type(head) is nn.Linear:
        mods.append(head)
    return Bf16Linears(mods)
