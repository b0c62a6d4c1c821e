"""Keys k: the input of the MLP output projection (W_out) at the subject's last token.

ROME §3.1: the MLP at layer ℓ is a key-value memory, W_out k = v; the key of a subject is the input of
W_out at the subject's last token, averaged over context templates (k* = mean_j k(x_j + s)).

Token positions come from token ids, never from string guesses: the subject-last index of a template is
``len(ids(prefix + subject)) - 1`` when those ids are a prefix of the prompt's ids; when the subject
tokenizes differently inside the prompt (BPE merges across its end), it is the token holding the subject's
last character. Batches are right padded through ``handle.tokens`` (the tokenizer is never mutated), so
indices count from the left, and one forward captures every requested layer, stopping after the deepest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..hooks import StopForward, get_module
from ..types import EditRequest
from .stats import context_length
from .templates import TemplateGroups, compose, flatten, split_template


@dataclass(frozen=True)
class Row:
    """One tokenized prompt and the position whose activation we read or edit."""

    ids: tuple[int, ...]
    index: int


def subject_last(tokens, template: str, subject: str) -> Row:
    """Ids of ``template`` filled with ``subject`` and the index of the subject's last token."""
    prefix, _ = split_template(template)
    ids = tokens.prompt_ids(template.format(subject))
    head = tokens.prompt_ids(prefix + subject)
    if ids[: len(head)] == head:
        return Row(tuple(ids), len(head) - 1)
    return Row(tuple(ids), token_at_char(tokens, ids, len(prefix) + len(subject) - 1))


def token_at_char(tokens, ids: Sequence[int], char: int) -> int:
    """Index of the token of ``ids`` (BOS skipped) whose decoded text covers character ``char``."""
    start = len(tokens.bos)
    for i in range(start, len(ids)):
        if len(tokens.tok.decode(list(ids[start : i + 1]))) > char:
            return i
    return len(ids) - 1


def request_rows(tokens, requests: Sequence[EditRequest], groups: TemplateGroups) -> list[Row]:
    """Rows for every (request, template) pair, request-major: row r*T + t is request r in template t."""
    flat, _ = flatten(groups)
    return [subject_last(tokens, compose(ctx, r.template), r.subject) for r in requests for ctx in flat]


@torch.no_grad()
def gather(handle, rows: Sequence[Row], points: Sequence[tuple[str, str]], batch_size: int = 128
           ) -> list[torch.Tensor]:
    """Activations at each row's index for each (module path, "input" | "output") point.

    Returns one float32 tensor [n_rows, d] per point. The forward stops as soon as every point of a batch
    is captured, so layers above the deepest point never run.
    """
    parts = [_gather_chunk(handle, rows[s : s + batch_size], points) for s in range(0, len(rows), batch_size)]
    return [torch.cat([p[j] for p in parts]) for j in range(len(points))]


def _gather_chunk(handle, chunk: Sequence[Row], points: Sequence[tuple[str, str]]) -> list[torch.Tensor]:
    model, adapter = handle.model, handle.adapter
    ids, mask = handle.tokens.pad([list(r.ids) for r in chunk], "right")  # indices count from the left
    at = torch.tensor([r.index for r in chunk])
    got: dict[int, torch.Tensor] = {}

    def grab(j: int, x: torch.Tensor) -> None:
        x = adapter.per_token(x, len(chunk))  # [n, seq, d] (some FFNs read flattened tokens)
        got[j] = x[torch.arange(len(chunk)), at.to(x.device)].float().cpu()  # [n, d]
        if len(got) == len(points):
            raise StopForward

    hooks = []
    try:
        for j, (path, kind) in enumerate(points):
            module = get_module(model, path)
            if kind == "input":
                hooks.append(module.register_forward_pre_hook(lambda m, a, j=j: grab(j, a[0])))
            else:
                hooks.append(module.register_forward_hook(lambda m, a, o, j=j: grab(j, adapter.hidden(o))))
        model(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device),
              position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(handle.device), use_cache=False)
    except StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    if len(got) != len(points):
        raise RuntimeError(f"module(s) {[p for j, p in enumerate(points) if j not in got]} did not run")
    return [got[j] for j in range(len(points))]


def compute_keys(handle, requests: Sequence[EditRequest], layers: Sequence[int], groups: TemplateGroups,
                 batch_size: int = 128) -> dict[int, torch.Tensor]:
    """Per-template keys {layer: [n_requests, n_templates, d_ff]} from one forward over all rows."""
    rows = request_rows(handle.tokens, requests, groups)
    points = [(handle.adapter.mlp_out.format(layer), "input") for layer in layers]
    got = gather(handle, rows, points, batch_size)
    n_t = len(rows) // len(requests)
    return {layer: g.view(len(requests), n_t, -1) for layer, g in zip(layers, got, strict=True)}


@torch.no_grad()
def token_inputs(handle, ids: Sequence[int], layer: int, window: int = 512) -> torch.Tensor:
    """The input of W_out at ``layer`` at every token of ``ids``, read in windows of ``window`` tokens or the
    model's position limit (each opened by the model's BOS, whose own input is left out): float32
    [len(ids), d_ff]."""
    module = get_module(handle.model, handle.adapter.mlp_out.format(layer))
    bos = list(handle.tokens.bos)
    window = max(1, min(window, context_length(handle.model) - len(bos)))
    parts: list[torch.Tensor] = []

    def grab(_m, args) -> None:
        parts.append(handle.adapter.per_token(args[0], 1)[0, len(bos):].float().cpu())
        raise StopForward

    hook = module.register_forward_pre_hook(grab)
    try:
        for s in range(0, len(ids), window):
            try:
                handle.model(input_ids=torch.tensor([bos + list(ids[s:s + window])], device=handle.device),
                             use_cache=False)
            except StopForward:
                pass
    finally:
        hook.remove()
    if len(parts) != -(-len(ids) // window):
        raise RuntimeError(f"{handle.adapter.mlp_out.format(layer)} did not run")
    return torch.cat(parts) if parts else torch.zeros(0, 0)
