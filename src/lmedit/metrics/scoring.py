"""Teacher-forced scoring of answers: one batched forward gives token accuracy, predictions and NLL.

For a prompt p and answer a, the model reads p ++ a (see ``lmedit.tokens``) and at each answer position we
read the argmax prediction and the log-probability of the true next token. From that:
- token accuracy (the paper's / EasyEdit's Reliability, Generalization, Portability): mean(pred == label);
- predicted ids (Locality: agreement of the edited model's predictions with the original model's);
- mean per-token NLL (CounterFact's probability comparisons: P(a|p) = exp(-NLL)).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kv import SharedPrefix, body_and_head

MIN_SHARED_TOKENS = 16  # an in-context edit's prefix shorter than this is simply run with every row


@dataclass(frozen=True)
class TargetScore:
    """Scores of one (prompt, answer) pair."""

    pred: tuple[int, ...]  # argmax prediction at each answer position
    labels: tuple[int, ...]  # the answer's ids
    logprobs: tuple[float, ...]  # log p(label_j | prompt, label_<j)

    @property
    def accuracy(self) -> float:
        return sum(p == y for p, y in zip(self.pred, self.labels, strict=True)) / len(self.labels)

    @property
    def nll(self) -> float:
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """Per-token geometric-mean probability exp(-NLL)."""
        return float(torch.tensor(-self.nll).exp())

    def agreement(self, other: TargetScore) -> float:
        """Fraction of positions where two models predicted the same token (Locality)."""
        if self.labels != other.labels:
            raise ValueError("agreement needs scores of the same answer tokens")
        return sum(a == b for a, b in zip(self.pred, other.pred, strict=True)) / len(self.pred)


@torch.no_grad()
def score_targets(handle, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[TargetScore]:
    """Score each (prompt, answer) pair by teacher forcing on the handle's model as it is now.

    Prompts are rendered through ``handle.render`` (so in-context edits apply). Rows are batched by length
    to limit padding; padding is on the right, so no position of a real token moves. Under an in-context edit
    every row begins with the same context (IKE: hundreds of tokens of demonstrations): it runs once, and
    each batch runs only its rows' own tokens on a copy of its key/value cache (:mod:`lmedit.kv`).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    rendered = [handle.render(p) for p in prompts]
    lengths = [len(handle.tokens.prompt_ids(p)) + len(handle.tokens.target_ids(p, a))
               for p, a in zip(rendered, answers, strict=True)]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[TargetScore | None] = [None] * len(prompts)
    prefix = _context_prefix(handle)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = handle.tokens.teacher_forced([rendered[i] for i in idx], [answers[i] for i in idx])
        rows, cols = [], []
        for r in range(len(idx)):
            pos = batch.pred_positions(r)
            rows.extend([r] * len(pos))
            cols.extend(pos)
        logits = _prefixed_logits(prefix, batch, rows, cols) if prefix is not None else None
        if logits is None:
            logits = _logits_at(handle, batch, rows, cols)  # [n_positions, vocab]
        logp = F.log_softmax(logits.float(), dim=-1)
        labels = torch.tensor([y for lab in batch.labels for y in lab], device=logp.device)
        picked = logp.gather(1, labels[:, None])[:, 0].tolist()
        pred = logp.argmax(-1).tolist()
        k = 0
        for r, i in enumerate(idx):
            n = len(batch.labels[r])
            out[i] = TargetScore(tuple(pred[k : k + n]), tuple(batch.labels[r]), tuple(picked[k : k + n]))
            k += n
    return out  # type: ignore[return-value]


def _context_prefix(handle):
    """The active in-context edits' shared prefix, ready to serve batches; None when there is none or the
    model cannot take it (encoder-decoder, post-processed logits)."""
    if not handle.contexts or body_and_head(handle.model) is None:
        return None
    ids = handle.tokens.prompt_ids("".join(handle.contexts))
    if len(ids) < MIN_SHARED_TOKENS:
        return None
    return SharedPrefix(handle.model, ids, handle.device)


def _prefixed_logits(prefix, batch, rows: list[int], cols: list[int]) -> torch.Tensor | None:
    """Logits at (rows, cols) with the shared prefix served from its cache; None when the rows do not share
    enough of it (the context's last tokens may merge with a prompt's first ones; those are recomputed)."""
    k = prefix.shared_length(batch.input_ids, batch.attention_mask, min(cols))
    if k < MIN_SHARED_TOKENS:
        return None
    hidden = prefix.hidden(batch.input_ids, batch.attention_mask, k)
    return prefix.head(hidden[rows, [c - k for c in cols]])


def _logits_at(handle, batch, rows: list[int], cols: list[int]) -> torch.Tensor:
    """Logits at the given (row, position) pairs only: the unembedding runs on those positions alone."""
    return logits_at(handle, batch.model_inputs(handle.device), rows, cols)


def logits_at(handle, inputs: dict, rows, cols) -> torch.Tensor:
    """``_logits_at`` for ready model inputs (any extra keyword, e.g. ``use_cache``, is passed on)."""
    model = handle.model
    body_head = body_and_head(model)
    runs = body_head[0] if body_head else model
    if "use_cache" in inspect.signature(runs.forward).parameters:  # each batch is read once; the caches of
        inputs = {"use_cache": False, **inputs}  # recurrent families reject padded batches
    if body_head is None:
        return model(**inputs).logits[rows, cols]
    body, head = body_head
    hidden = body(**inputs).last_hidden_state  # [batch, seq, d]
    return head(hidden[rows, cols])
