"""Differentiable pieces shared by gradient-based trained editors (MEND, KE).

- :func:`capture_grads`: per-token gradient factors of the edit loss at chosen linear modules. For a linear
  map y = W u the fine-tuning gradient of one example is ∇_W L = Σ_t δ_t u_tᵀ (MEND eq. 1), with u_t the
  module input and δ_t = ∂L/∂y_t at token t; both are read with hooks, W itself never needs a gradient.
- :func:`delta_hooks`: run the model *as if* W were W + ΔW, without touching W (forward hooks add
  u ΔWᵀ to the module output), so the editor network gets gradients through the edited model.
- :func:`answer_logprobs`, :func:`nll_and_acc`, :func:`kl_at`: teacher-forced losses on answer tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..hooks import get_module
from ..metrics.scoring import _logits_at

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

Factors = tuple[torch.Tensor, torch.Tensor]  # (A [d_out, r], B [d_in, r]): ΔW (out-in layout) = A Bᵀ


def answer_logprobs(handle: ModelHandle, prompts: Sequence[str], answers: Sequence[str], prefix: Any = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Log-probabilities at the answer positions of teacher-forced prompt+answer rows.

    Returns (logp [n_pos, vocab], labels [n_pos], row_of_position) -- the unembedding runs on those
    positions only (the vocabulary projection is the most expensive part of a small model). ``prefix``: a
    :class:`~lmedit.training.prefix.PrefixCache` that skips the frozen lower layers (training only).
    """
    rendered = [handle.render(p) for p in prompts]
    batch = handle.tokens.teacher_forced(rendered, list(answers))
    rows, cols = [], []
    for r in range(len(rendered)):
        pos = batch.pred_positions(r)
        rows += [r] * len(pos)
        cols += pos
    with _skipping(prefix, batch):
        logits = _logits_at(handle, batch, rows, cols)  # [n_pos, vocab]
    labels = torch.tensor([y for lab in batch.labels for y in lab], device=logits.device)
    return F.log_softmax(logits.float(), dim=-1), labels, rows


def nll_and_acc(logp: torch.Tensor, labels: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, float]:
    """Mean over rows of each row's mean token NLL, and the mean token accuracy (EasyEdit's edit accuracy)."""
    tok_nll = -logp.gather(1, labels[:, None])[:, 0]  # [n_pos]
    row = torch.tensor(rows, device=logp.device)
    n_rows = int(row.max()) + 1
    count = torch.zeros(n_rows, device=logp.device).index_add_(0, row, torch.ones_like(tok_nll))
    per_row = torch.zeros(n_rows, device=logp.device).index_add_(0, row, tok_nll) / count
    hit = (logp.argmax(-1) == labels).float()
    acc_row = torch.zeros(n_rows, device=logp.device).index_add_(0, row, hit) / count
    return per_row.mean(), float(acc_row.mean())


def kl_at(base_logp: torch.Tensor, new_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_base ‖ p_new) (MEND's locality term)."""
    return (base_logp.exp() * (base_logp - new_logp)).sum(-1).mean()


def _token_mask(batch: Any, handle: ModelHandle) -> torch.Tensor:
    """Which positions of the edited stream are real tokens (the edited layers are the decoder's)."""
    mask = batch.decoder_attention_mask if handle.is_encoder_decoder else batch.attention_mask
    return mask.reshape(-1).bool()


def _skipping(prefix: Any, batch: Any) -> Any:
    return prefix.skipping(batch) if prefix is not None else contextlib.nullcontext()


def capture_grads(handle: ModelHandle, paths: Sequence[str], prompts: Sequence[str], targets: Sequence[str],
                  prefix: Any = None) -> tuple[dict[str, Factors], torch.Tensor, float, torch.Tensor]:
    """(u, δ) token factors of the edit loss's gradient at each module in ``paths``.

    The loss is the sum over rows of each row's mean target NLL. Returns ({path: (U [T, d_in], D [T, d_out])},
    loss, token accuracy before the edit, row of each token [T]); T = real tokens of all rows, padding dropped.
    """
    rendered = [handle.render(p) for p in prompts]
    batch = handle.tokens.teacher_forced(rendered, list(targets))
    inputs: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(path: str):
        def hook(_m, args, out):
            inputs[path] = args[0].detach()
            z = torch.zeros_like(out, requires_grad=True)  # ∂L/∂z = ∂L/∂y = δ
            zeros[path] = z
            return out + z
        return hook

    for p in paths:
        handles.append(get_module(handle.model, p).register_forward_hook(make_hook(p)))
    try:
        with torch.enable_grad(), _skipping(prefix, batch):
            rows, cols = [], []
            for r in range(len(rendered)):
                pos = batch.pred_positions(r)
                rows += [r] * len(pos)
                cols += pos
            logits = _logits_at(handle, batch, rows, cols)
            labels = torch.tensor([y for lab in batch.labels for y in lab], device=logits.device)
            logp = F.log_softmax(logits.float(), dim=-1)
            loss, acc = nll_and_acc(logp, labels, rows)
            grads = torch.autograd.grad(loss * len(rendered), [zeros[p] for p in paths])
    finally:
        for h in handles:
            h.remove()
    keep = _token_mask(batch, handle).to(logits.device)
    seq = (batch.decoder_input_ids if handle.is_encoder_decoder else batch.input_ids).shape[1]
    token_rows = keep.nonzero()[:, 0] // seq  # [T]
    out = {}
    for p, g in zip(paths, grads, strict=True):
        u = inputs[p].reshape(-1, inputs[p].shape[-1])[keep].float()  # [T, d_in]
        d = g.reshape(-1, g.shape[-1])[keep].float()  # [T, d_out]
        out[p] = (u, d)
    return out, loss.detach(), acc, token_rows


def edit_and_loc_losses(handle: ModelHandle, batch: Sequence[Any], deltas: dict[str, Factors | torch.Tensor],
                        prefix: Any = None) -> tuple[torch.Tensor, float, torch.Tensor]:
    """The meta-training terms of an edit (MEND eq. 5, KE eq. 4) for a batch of TrainExamples:
    (L_edit = NLL of y_e on x_e and x_e' under θ', token accuracy there, KL(p_θ ‖ p_θ') on the x_loc answers)."""
    reqs = [ex.request for ex in batch]
    targets = [r.target_new for r in reqs]
    loc_p, loc_a = [ex.loc.prompt for ex in batch], [ex.loc.answer for ex in batch]
    with torch.no_grad():
        base_loc, _, _ = answer_logprobs(handle, loc_p, loc_a, prefix)  # [n_loc_pos, vocab]
    k = len(reqs)
    with delta_hooks(handle, deltas):  # one pass for edit, rephrase and locality rows
        logp, labels, rows = answer_logprobs(handle, [r.text for r in reqs] + [ex.rephrase for ex in batch] + loc_p,
                                             targets + targets + loc_a, prefix)
    is_edit = torch.tensor(rows, device=logp.device) < 2 * k
    edit_nll, edit_acc = nll_and_acc(logp[is_edit], labels[is_edit], [r for r in rows if r < 2 * k])
    return edit_nll, edit_acc, kl_at(base_loc, logp[~is_edit])


@contextlib.contextmanager
def delta_hooks(handle: ModelHandle, deltas: dict[str, Factors | torch.Tensor]) -> Iterator[None]:
    """Run the model as if each module's weight were W + ΔW (out-in layout), differentiably.

    ``deltas[path]`` is a dense ΔW [d_out, d_in] or low-rank factors (A [d_out, r], B [d_in, r]).
    """
    handles = []

    def make_hook(delta: Factors | torch.Tensor):
        def hook(_m, args, out):
            u = args[0]  # [batch, seq, d_in]
            if isinstance(delta, tuple):
                a, b = delta
                extra = (u.to(b.dtype) @ b) @ a.T  # [batch, seq, d_out]
            else:
                extra = u.to(delta.dtype) @ delta.T
            return out + extra.to(out.dtype)
        return hook

    for p, d in deltas.items():
        handles.append(get_module(handle.model, p).register_forward_hook(make_hook(d)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def edited_paths(handle: ModelHandle, layers: Sequence[int], which: str) -> list[str]:
    """Module paths of the MLP matrices to edit: ``which`` = "in", "out" or "both" (in before out)."""
    handle.adapter.check_layers(handle.model, list(layers))
    if which in ("in", "both") and not handle.adapter.mlp_in:
        raise ConfigError(f"matrices={which!r}: {type(handle.model).__name__} has no FFN input projection to edit "
                          f"({handle.adapter.edit_site_reason or 'none was found'}); use matrices='out'")
    paths = []
    for i in layers:
        if which in ("in", "both"):
            paths += [t.format(i) for t in handle.adapter.mlp_in]
        if which in ("out", "both"):
            paths.append(handle.adapter.mlp_out.format(i))
    return paths


def weight_shape(handle: ModelHandle, path: str) -> tuple[int, int]:
    """(d_out, d_in) of a module's weight, in the adapter's stated layout."""
    w = handle.adapter.weight_out_in(get_module(handle.model, path))
    return int(w.shape[0]), int(w.shape[1])


def to_param_factors(handle: ModelHandle, a: torch.Tensor, b: torch.Tensor) -> Factors:
    """Low-rank factors of an out-in ΔW = A Bᵀ as factors of the parameter's own layout."""
    return (b, a) if handle.adapter.weight_layout == "in_out" else (a, b)
