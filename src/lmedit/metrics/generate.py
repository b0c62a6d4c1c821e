"""Greedy free generation for scoring: the prompt framed as the user asks, batched, with a key/value cache.

Contexts (how a prompt is put to the model):
- ``question`` (default): the prompt alone;
- ``qa``: a short QA instruction around it (:data:`QA_TEMPLATE`);
- ``chat``: the model's chat template, one user turn (a model without a template is an error).
Active in-context edits (IKE's demonstrations) always come first, as :meth:`ModelHandle.render` puts them.

Stopping (never from the gold answer, whose length the model must not learn): at an end-of-sequence token,
at the first line break after the answer has begun (leading spaces and newlines do not stop it: SmolLM2 often
starts its answer on a new line after a question), or after ``max_new_tokens`` (default 32).

Rows are left-padded and batched by length; each step runs one token per row on the cache, and a row that
stops leaves the batch. Rows that begin with the same tokens (an in-context edit's demonstrations, a chat
template's system turn) run those once (:class:`lmedit.kv.SharedPrefix`). A model whose edit must read
every token of each forward (SERAC routes by the input's text) runs the whole sequence at each step instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..kv import SharedPrefix, body_and_head, cache_kwarg, needs_whole_sequence, new_cache
from ..types import EditInputError

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

CONTEXTS = ("question", "qa", "chat")
QA_TEMPLATE = "Answer the question with a short answer.\nQuestion: {prompt}\nAnswer:"
DEFAULT_MAX_NEW_TOKENS = 32
MIN_SHARED_TOKENS = 16  # a common beginning shorter than this is simply run with every row


class GenerationError(EditInputError):
    """Generation cannot run as asked (an unknown context, a model without a chat template, an empty prompt)."""


@dataclass(frozen=True)
class GenSettings:
    """How answers are generated. ``key()`` is what changes the answers (the batch size does not)."""

    context: str = "question"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise GenerationError(f"unknown generation context {self.context!r}; use one of {', '.join(CONTEXTS)}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise GenerationError(f"the generation batch size must be a positive integer, got {self.batch_size!r}")

    def key(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "batch_size"}


@dataclass(frozen=True)
class Generation:
    """One greedy continuation: its text (special tokens dropped), how many tokens, and why it stopped
    (``eos``, ``newline`` or ``cap``)."""

    text: str
    tokens: int
    stop: str


def frame(handle: ModelHandle, prompt: str, context: str) -> str:
    """``prompt`` as the model reads it for generation under ``context`` (in-context edits first)."""
    if context == "question":
        return handle.render(prompt)
    if context == "qa":
        return handle.render(QA_TEMPLATE.format(prompt=prompt))
    if context == "chat":
        tok = handle.tokenizer
        if not getattr(tok, "chat_template", None):
            raise GenerationError(f"model {handle.name!r} has no chat template; use --context question or qa")
        text = tok.apply_chat_template([{"role": "user", "content": handle.render(prompt)}], tokenize=False,
                                       add_generation_prompt=True)
        bos = tok.bos_token
        # the token policy adds BOS itself where the tokenizer does: never twice
        return text[len(bos):] if handle.tokens.bos and bos and text.startswith(bos) else text
    raise GenerationError(f"unknown generation context {context!r}; use one of {', '.join(CONTEXTS)}")


def stop_ids(handle: ModelHandle) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {handle.tokens.eos_id} if handle.tokens.eos_id is not None else set()
    cfg_eos = getattr(getattr(handle.model, "generation_config", None), "eos_token_id", None)
    ids |= set(cfg_eos if isinstance(cfg_eos, list | tuple) else [] if cfg_eos is None else [cfg_eos])
    return ids


def answer_ended(text: str) -> bool:
    """True once ``text`` has a line break after its first non-whitespace character."""
    return "\n" in text.lstrip()


@torch.no_grad()
def generate_texts(handle: ModelHandle, texts: list[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = 32, stop_at_newline: bool = True) -> list[Generation]:
    """Greedy continuations of already framed ``texts`` (see the module docstring), in input order."""
    rows = [handle.tokens.prompt_ids(t) for t in texts]
    for t, r in zip(texts, rows, strict=True):
        if not r:
            raise GenerationError(f"prompt {t!r} has no tokens and the model adds no BOS; give a non-empty prompt")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[Generation | None] = [None] * len(rows)
    prefixes: list[SharedPrefix] = []  # the first batch's common beginning, offered to the later batches
    run = _run_seq2seq if handle.is_encoder_decoder else _run_decoder
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        gens = run(handle, [rows[i] for i in idx], max_new_tokens, stop_at_newline, prefixes)
        for i, g in zip(idx, gens, strict=True):
            out[i] = g
    return out  # type: ignore[return-value]


def _common_prefix(rows: list[list[int]], first: list[int] | None = None) -> int:
    """Leading tokens that every row (and ``first``, when given) shares, leaving each row at least one token
    of its own."""
    k = min(len(r) for r in rows) - 1
    first = rows[0] if first is None else first
    k = min(k, len(first))
    for r in rows:
        j = 0
        while j < k and r[j] == first[j]:
            j += 1
        k = j
    return max(k, 0)


class _Stepper:
    """One batch's forward passes: on a key/value cache (decoder-only models), or on the whole sequence each
    step when the edited model must read every token (:func:`lmedit.kv.needs_whole_sequence`)."""

    def __init__(self, handle: ModelHandle, n: int, k: int, prefix: SharedPrefix | None) -> None:
        self.model, self.device = handle.model, handle.device
        self.whole = needs_whole_sequence(handle.model)
        self.body_head = body_and_head(handle.model)  # None in whole-sequence mode
        self.cache = None if self.whole else prefix.batch_cache(k, n) if prefix is not None else new_cache(handle.model)
        self.kw = cache_kwarg(self.body_head[0]) if self.body_head else "past_key_values"
        self.seen: torch.Tensor | None = None  # whole-sequence mode: every token so far [rows, len]

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits [rows, vocab] after ``ids`` (the new tokens), ``mask`` covering cache + new."""
        if self.whole:
            self.seen = ids if self.seen is None else torch.cat([self.seen, ids], 1)
            full_pos = (mask.cumsum(-1) - 1).clamp(min=0)
            return self.model(input_ids=self.seen.to(self.device), attention_mask=mask.to(self.device),
                              position_ids=full_pos.to(self.device), use_cache=False).logits[:, -1].float()
        kw = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
              "position_ids": positions.to(self.device), "use_cache": True, self.kw: self.cache}
        if self.body_head is None:
            return self.model(**kw).logits[:, -1].float()
        body, head = self.body_head
        return head(body(**kw).last_hidden_state[:, -1]).float()

    def keep(self, rows: list[int]) -> None:
        if self.whole:
            self.seen = self.seen[rows]
        else:
            self.cache.batch_select_indices(torch.tensor(rows, device=self.device))


def _run_decoder(handle: ModelHandle, rows: list[list[int]], cap: int, stop_at_newline: bool,
                 prefixes: list[SharedPrefix]) -> list[Generation]:
    n, tok = len(rows), handle.tokenizer
    prefix = None
    k = 0
    if body_and_head(handle.model) is not None:
        if prefixes:  # the beginning an earlier batch shared (an in-context edit's demonstrations)
            k = _common_prefix(rows, prefixes[0].ids)
            prefix = prefixes[0]
        if k < MIN_SHARED_TOKENS:
            k = _common_prefix(rows)
            prefix = None
            if k >= MIN_SHARED_TOKENS and not prefixes:
                prefixes.append(SharedPrefix(handle.model, rows[0][:k], handle.device))
                prefix = prefixes[0]
            elif k >= MIN_SHARED_TOKENS:
                prefix = SharedPrefix(handle.model, rows[0][:k], handle.device)
    if prefix is None:
        k = 0
    ids, suffix_mask = handle.tokens.pad([r[k:] for r in rows], "left")
    mask = torch.cat([torch.ones(n, k, dtype=suffix_mask.dtype), suffix_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step = _Stepper(handle, n, k, prefix)
    logits = step.logits(ids, mask, positions[:, k:])
    last = positions[:, -1]
    ends = stop_ids(handle)
    new: list[list[int]] = [[] for _ in rows]
    stops: list[str | None] = [None] * n
    active = list(range(n))
    for _ in range(cap):
        nxt = logits.argmax(-1).tolist()
        for j, r in enumerate(active):
            if nxt[j] in ends:
                stops[r] = "eos"
                continue
            new[r].append(nxt[j])
            if stop_at_newline and answer_ended(tok.decode(new[r], skip_special_tokens=True)):
                stops[r] = "newline"
            elif len(new[r]) >= cap:
                stops[r] = "cap"
        keep = [j for j, r in enumerate(active) if stops[r] is None]
        if not keep:
            break
        if len(keep) < len(active):
            step.keep(keep)
            mask, last = mask[keep], last[keep]
        active = [active[j] for j in keep]
        mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype)], 1)
        last = last + 1
        logits = step.logits(torch.tensor([[nxt[j]] for j in keep]), mask, last[:, None])
    return [Generation(tok.decode(t, skip_special_tokens=True), len(t), s or "cap")
            for t, s in zip(new, stops, strict=True)]


def _run_seq2seq(handle: ModelHandle, rows: list[list[int]], cap: int, stop_at_newline: bool,
                 prefixes: list[SharedPrefix]) -> list[Generation]:
    """Encoder-decoder models: transformers' greedy search, then the same stop rules on its output."""
    ids, mask = handle.tokens.pad(rows, "right")
    cfg = handle.model.config
    # as ModelHandle.generate: a decoder deeper or shallower than the encoder generates without the cache
    uneven = getattr(cfg, "num_decoder_layers", None) not in (None, cfg.num_layers)
    out = handle.model.generate(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device),
                                max_new_tokens=cap, do_sample=False, pad_token_id=handle.tokens.pad_id,
                                **({"use_cache": False} if uneven else {}))
    ends, tok = stop_ids(handle), handle.tokenizer
    gens = []
    for row in out[:, 1:].tolist():  # the decoder start token is not generated
        new: list[int] = []
        stop = "cap"
        for t in row:
            if t in ends:
                stop = "eos"
                break
            new.append(t)
            if stop_at_newline and answer_ended(tok.decode(new, skip_special_tokens=True)):
                stop = "newline"
                break
        gens.append(Generation(tok.decode(new, skip_special_tokens=True), len(new), stop))
    return gens
