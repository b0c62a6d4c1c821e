"""One recorded forward pass of a model on a tiny input, and the two questions discovery asks of it.

:func:`record` hooks every module and keeps what each received and returned; :func:`linear_layout` says
whether a module computed y = W x + b (and in which weight layout); :func:`mixes_tokens` whether a module's
output at one position depends on its input at another (attention does, an FFN does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapter import ModelAdapter

SEQ = 16  # tokens of the probe: a routed expert practically never receives all of them


@dataclass
class Seen:
    """What one module received and returned in the recorded forward."""

    order: int = -1  # when its forward started
    done: int = -1  # when it returned
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    x: torch.Tensor | None = None  # the first tensor argument
    y: torch.Tensor | None = None  # the hidden tensor of the output


def first_tensor(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, int | str | None]:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a, i
    for k in ("hidden_states", "hidden", "x", "input"):
        if isinstance(kwargs.get(k), torch.Tensor):
            return kwargs[k], k
    return None, None


def hidden_of(out: Any) -> torch.Tensor | None:
    out = ModelAdapter.hidden(out) if isinstance(out, tuple | list) and out else out
    if hasattr(out, "last_hidden_state") and not isinstance(out, torch.Tensor):
        out = out.last_hidden_state
    return out if isinstance(out, torch.Tensor) and out.is_floating_point() else None


def probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A fixed tiny batch: one row of SEQ token ids that every vocabulary has (ids 3.. up to 3+SEQ)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, (1, SEQ), generator=g)
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits


@torch.no_grad()
def record(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Seen]:
    """Inputs and outputs of every module in one forward (modules that did not run are absent)."""
    seen: dict[str, Seen] = {}
    clock = iter(range(1 << 62))
    hooks = []

    def pre(name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in seen:  # the first call of a module that runs twice (weight-shared blocks)
                x, _ = first_tensor(args, kwargs)
                # copies: some blocks add to their parts' outputs in place (Falcon: mlp_output += attn_output)
                seen[name] = Seen(order=next(clock), args=args, kwargs=dict(kwargs),
                                   x=x.clone() if x is not None else None)
        return hook

    def post(name: str):
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
            s = seen.get(name)
            if s is not None and s.done < 0:
                y = hidden_of(out)
                s.done, s.y = next(clock), y.clone() if y is not None else None
        return hook

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
            hooks.append(module.register_forward_hook(post(name), with_kwargs=True))
    try:
        run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def linear_layout(module: nn.Module, seen: Seen) -> str | None:
    """``"out_in"`` or ``"in_out"`` when ``module`` computed y = W x + b (or x W + b) in the recorded pass."""
    w = module.__dict__.get("_parameters", {}).get("weight")
    w = w.detach() if isinstance(w, torch.Tensor) else w
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or isinstance(module, nn.Embedding):
        return None
    if seen.x is None or seen.y is None or seen.x.shape[:-1] != seen.y.shape[:-1]:
        return None
    x, y = seen.x.double(), seen.y.double()
    bias = module.__dict__["_parameters"].get("bias")
    b = bias.detach().double() if isinstance(bias, torch.Tensor) else 0.0
    # rounding of the module's own dtype (bfloat16: ~1e-2); a wrong orientation is off by O(1)
    tol = max(1e-4, 4 * torch.finfo(seen.y.dtype).eps) * (1.0 + float(x.abs().max()) * float(w.abs().max())
                                                          * x.shape[-1] ** 0.5)
    for layout, wt in (("out_in", w.double().T), ("in_out", w.double())):
        if wt.shape == (x.shape[-1], y.shape[-1]) and float((x @ wt + b - y).abs().max()) <= tol:
            return layout
    return None


@torch.no_grad()
def mixes_tokens(module: nn.Module, seen: Seen) -> bool:
    """Does the module's output at positions ≥ 1 depend on its input at position 0? (Attention: yes.)"""
    x, where = first_tensor(seen.args, seen.kwargs)
    if x is None or seen.y is None or x.dim() != 3 or x.shape[1] < 2 or seen.y.dim() != 3:
        return False  # flattened tokens [n, d] (an expert's input): position-wise by construction
    bumped = x.clone()
    bumped[:, 0] += 1.0 + x[:, 0].abs()
    args, kwargs = list(seen.args), dict(seen.kwargs)
    if isinstance(where, int):
        args[where] = bumped
    else:
        kwargs[where] = bumped
    try:
        out = hidden_of(module(*args, **kwargs))
    except Exception:  # noqa: BLE001 -- a module that cannot be re-run alone is not a position-wise FFN
        return True
    if out is None or out.shape != seen.y.shape:
        return True
    scale = float(seen.y.abs().max()) or 1.0  # a re-run position-wise module gives the same values, to rounding
    return float((out[:, 1:] - seen.y[:, 1:]).abs().max()) > 10 * torch.finfo(out.dtype).eps * scale
