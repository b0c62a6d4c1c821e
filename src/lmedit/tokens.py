"""One tokenization policy per model: how targets are joined to prompts, BOS handling, padding.

Rules (each one fixes a known bug of the field):
- a target follows its prompt after one space (unless the prompt ends in, or the target starts with,
  whitespace); its ids are the suffix of the joint encoding past the prompt's ids, so a BPE tokenizer
  sees " English" and a SentencePiece tokenizer never emits a lone "▁";
- BOS is added once, to the prompt, and only if the tokenizer adds it by default;
- batches are padded here, per call, on the side the caller names; the shared tokenizer is never mutated;
- positions are computed from lengths, never by comparing ids with ``pad_token_id`` (pad == eos == bos
  for some models).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

Side = Literal["left", "right"]


@dataclass
class Batch:
    """A padded batch. ``spans[i]`` = (first index, length) of row i's scored tokens in ``input_ids`` (or in
    ``decoder_input_ids`` for encoder-decoder models); ``labels[i]`` are their target ids."""

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    spans: list[tuple[int, int]]
    labels: list[list[int]]
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None
    lengths: list[int] | None = None

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        d = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.decoder_input_ids is not None:
            d["decoder_input_ids"] = self.decoder_input_ids
            d["decoder_attention_mask"] = self.decoder_attention_mask
        else:
            # positions from the mask, so left padding does not shift them
            d["position_ids"] = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        if device is not None:
            d = {k: v.to(device) for k, v in d.items()}
        return d

    def pred_positions(self, i: int) -> list[int]:
        """Logit positions that predict row i's scored tokens (shifted by one for decoder-only)."""
        start, n = self.spans[i]
        shift = 0 if self.decoder_input_ids is not None else 1
        return [start + j - shift for j in range(n)]


def join(prompt: str, target: str) -> str:
    """The separator between a prompt and its answer: one space unless whitespace is already there."""
    if not prompt or prompt[-1].isspace() or target[:1].isspace():
        return ""
    return " "


def with_answer(prompt: str, answer: str) -> str:
    """``prompt`` followed by ``answer`` as one text, joined as :func:`join` says."""
    return prompt + join(prompt, answer) + answer


class TokenPolicy:
    """Tokenization rules for one model (see the module docstring)."""

    def __init__(self, tokenizer, encoder_decoder: bool = False) -> None:
        self.tok = tokenizer
        self.encoder_decoder = encoder_decoder
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos: list[int] = [bos] if (bos is not None and probe[:1] == [bos] and bare[:1] != [bos]) else []
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id: int = int(pad)
        self.eos_id: int | None = tokenizer.eos_token_id
        self.decoder_start_id: int = self.pad_id
        self._encode = lru_cache(maxsize=65536)(self._encode_uncached)

    # --- single strings ----------------------------------------------------------------------------
    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        return list(self._encode(text))

    def prompt_ids(self, prompt: str) -> list[int]:
        """Ids of a prompt as the model reads it (with BOS if the tokenizer adds one; T5 adds its EOS)."""
        if self.encoder_decoder:
            return list(self.tok(prompt, add_special_tokens=True)["input_ids"])
        return self.bos + self.encode(prompt)

    def target_ids(self, prompt: str, target: str) -> list[int]:
        """Ids of ``target`` as it continues ``prompt`` (see module rules); never empty for a non-empty target."""
        if self.encoder_decoder:
            return self.encode(target)
        sep = join(prompt, target)
        p = self.encode(prompt)
        both = self.encode(prompt + sep + target)
        if both[: len(p)] == p and len(both) > len(p):
            return both[len(p) :]
        # the joint encoding merged across the boundary: encode the target alone, drop pure-space tokens
        ids = self.encode(sep + target)
        while len(ids) > 1 and not self.tok.decode(ids[:1]).strip():
            ids = ids[1:]
        return ids

    def words(self, ids: list[int]) -> list[str]:
        return [self.tok.decode([i]) for i in ids]

    # --- batches -----------------------------------------------------------------------------------
    def pad(self, rows: list[list[int]], side: Side) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id lists to one tensor; returns (ids [batch, seq], mask [batch, seq])."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if side == "right":
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = 1
            else:
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
        return ids, mask

    def prompts(self, prompts: list[str], side: Side = "right") -> Batch:
        """A batch of bare prompts; ``spans[i]`` = (last prompt token index, 1)."""
        rows = [self.prompt_ids(p) for p in prompts]
        ids, mask = self.pad(rows, side)
        width = ids.shape[1]
        spans = [((len(r) - 1) if side == "right" else width - 1, 1) for r in rows]
        return Batch(ids, mask, spans, [[] for _ in rows], lengths=[len(r) for r in rows])

    def teacher_forced(self, prompts: list[str], targets: list[str], side: Side = "right") -> Batch:
        """Prompt + target batches for teacher-forced scoring and training.

        Decoder-only: each row is prompt ids ++ target ids. Encoder-decoder: the prompt goes to the encoder
        and the decoder reads [start] ++ target[:-1] (a proper right shift).
        """
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        tgt = [self.target_ids(p, t) for p, t in zip(prompts, targets, strict=True)]
        for t, ids in zip(targets, tgt, strict=True):
            if not ids:
                raise ValueError(f"target {t!r} tokenizes to nothing; give a non-empty answer")
        if self.encoder_decoder:
            enc = [self.prompt_ids(p) for p in prompts]
            ids, mask = self.pad(enc, "right")
            dec = [[self.decoder_start_id] + t[:-1] for t in tgt]
            dids, dmask = self.pad(dec, "right")
            spans = [(0, len(t)) for t in tgt]
            return Batch(ids, mask, spans, tgt, dids, dmask, lengths=[len(r) for r in enc])
        rows = [self.prompt_ids(p) + t for p, t in zip(prompts, tgt, strict=True)]
        ids, mask = self.pad(rows, side)
        width = ids.shape[1]
        spans = []
        for r, t in zip(rows, tgt, strict=True):
            off = 0 if side == "right" else width - len(r)
            spans.append((off + len(r) - len(t), len(t)))
        return Batch(ids, mask, spans, tgt, lengths=[len(r) for r in rows])
