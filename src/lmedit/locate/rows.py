"""The rows of a value optimisation: each request's rewriting prompts (context template + prompt, target
appended, teacher forced) and its KL prompt, padded into one batch, with every position that carries loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..tokens import with_answer
from ..types import EditRequest
from .keys import subject_last
from .templates import TemplateGroups, compose, flatten

KL_TEMPLATE = "{} is a"


@dataclass
class Part:
    """One request's rows: every rewriting prompt (template + prompt, target appended, teacher forced), then
    the KL prompt."""

    seqs: list[list[int]]  # unpadded rows; the KL row is last
    index: list[int]  # subject-last index of each row (where δ is added)
    targets: list[tuple[int, int, int]]  # (row, col, label) of every target position

    @property
    def suffix_len(self) -> int:
        return max(len(s) - i for s, i in zip(self.seqs, self.index, strict=True))


def request_rows(handle, request: EditRequest, groups: TemplateGroups, end: str = "") -> Part:
    """``end``: text taught right after the new answer (``answer_end``; "" = the answer alone, as the papers)."""
    tokens = handle.tokens
    flat, _ = flatten(groups)
    seqs, index, targets = [], [], []
    for r, ctx in enumerate(flat):
        template = compose(ctx, request.template)
        row = subject_last(tokens, template, request.subject)
        prompt = template.format(request.subject)
        target = tokens.target_ids(prompt, request.target_new)
        if end:
            target = target + tokens.target_ids(with_answer(prompt, request.target_new), end)
        seqs.append(list(row.ids) + target[:-1])
        index.append(row.index)
        targets += [(r, len(row.ids) - 1 + j, y) for j, y in enumerate(target)]
    kl = subject_last(tokens, KL_TEMPLATE, request.subject)
    return Part(seqs + [list(kl.ids)], index + [kl.index], targets)


@dataclass
class Problem:
    """The rows of one or more requests, right padded, request after request. Loss positions: every target
    position, then one KL position per request (the last row of each request)."""

    ids: torch.Tensor  # [rows, seq]
    mask: torch.Tensor  # [rows, seq]
    index: torch.Tensor  # [rows] subject-last index of each row
    rows: list[int]  # (row, col) of every logit position that carries loss
    cols: list[int]
    labels: torch.Tensor  # [n_target_positions]
    owner: torch.Tensor  # [n_target_positions] row of each target position
    request: torch.Tensor  # [rows] request (0..n_requests-1) of each row
    start: list[int]  # first row of each request (its bare "{}" template row)
    n_rewrite: torch.Tensor  # [n_requests] rewriting rows per request
    seqs: list[list[int]]

    @property
    def n_requests(self) -> int:
        return len(self.start)


def assemble(handle, parts: Sequence[Part]) -> Problem:
    seqs, index, request, start, targets, kl = [], [], [], [], [], []
    for g, part in enumerate(parts):
        r0 = len(seqs)
        start.append(r0)
        seqs += part.seqs
        index += part.index
        request += [g] * len(part.seqs)
        targets += [(r0 + r, c, y) for r, c, y in part.targets]
        kl.append((len(seqs) - 1, part.index[-1]))
    ids, mask = handle.tokens.pad(seqs, "right")
    rows = [r for r, _, _ in targets] + [r for r, _ in kl]
    cols = [c for _, c, _ in targets] + [c for _, c in kl]
    return Problem(ids, mask, torch.tensor(index), rows, cols, torch.tensor([y for _, _, y in targets]),
                    torch.tensor([r for r, _, _ in targets]), torch.tensor(request), start,
                    torch.tensor([len(p.seqs) - 1 for p in parts]), seqs)


def problem(handle, request: EditRequest, groups: TemplateGroups, end: str = "") -> Problem:
    """The problem of one request."""
    return assemble(handle, [request_rows(handle, request, groups, end)])
