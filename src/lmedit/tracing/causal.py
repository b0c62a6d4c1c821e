"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT", §2.1).

Three runs of the same prompt:
- clean: the model predicts the answer token a with probability P[a] (``high_score``);
- corrupted: the subject's embeddings get noise, x[b:e] += ν·ε, ε ~ N(0, I); P*[a] (``low_score``) drops;
- corrupted-with-restoration: as corrupted, but one hidden state h_ℓ[t] (or the MLP / attention outputs of a
  window of layers around ℓ) is overwritten with its clean value; P*_clean h[a] measures how much that state
  carries the fact. The indirect effect is IE = P*_clean h[a] − P*[a].

The shape follows TransformerLens' ``patching.py``: one generic primitive, :meth:`Tracer.restore`, takes a
list of *restoration sets* (module path -> token positions whose clean output is written back) and scores
them; :func:`trace_fact` is a thin specialisation that builds one set per (token, layer) cell. Many sets are
stacked along the batch dimension (S corrupted rows each, the same noise for every set), so a whole table
costs a few large forwards instead of one small forward per cell.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..hooks import trace as hook_trace
from ..io import atomic_write
from .noise import resolve_noise

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
RestorationSet = dict[str, Sequence[int]]  # module path -> token positions restored at its output


@dataclass
class TraceResult:
    """One causal-tracing table.

    Attributes:
        scores: [tokens, layers] mean p(answer) over the corrupted rows after restoring (token, layer);
            for mlp/attn the column is the centre of the restored window. Rows not traced are NaN.
        low_score: p(answer) corrupted, nothing restored. high_score: p(answer) clean.
        tokens: the prompt's tokens as strings. subject_range: [start, end) token span of the subject.
        answer: the traced answer token (decoded). kind: hidden | mlp | attn. window: layers restored per
            cell (1 for hidden). noise: the absolute noise scale ν. correct_prediction: whether the clean
            model's top token is the answer (always True when no answer was given).
    """

    scores: np.ndarray
    low_score: float
    high_score: float
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    kind: str
    window: int
    noise: float
    correct_prediction: bool
    input_ids: list[int] = field(default_factory=list)
    answer_id: int = -1
    samples: int = 0
    prompt: str = ""
    subject: str = ""

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def effects(self) -> np.ndarray:
        """Indirect effects IE = score − low_score, [tokens, layers]."""
        return self.scores - self.low_score

    def peak(self) -> tuple[int, int]:
        """(token, layer) of the largest restored probability."""
        t, layer = np.unravel_index(np.nanargmax(self.scores), self.scores.shape)
        return int(t), int(layer)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.npz`` (arrays + metadata) and ``<path>.json`` (metadata + scores as lists)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in asdict(self).items() if k != "scores"}
        def npz(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
                np.savez(f, scores=self.scores, meta=json.dumps(meta))

        atomic_write(path.with_suffix(".npz"), npz)
        doc = dict(meta, scores=[[None if np.isnan(v) else float(v) for v in row] for row in self.scores])
        atomic_write(path.with_suffix(".json"), json.dumps(doc, indent=1))
        return path.with_suffix(".npz"), path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        """Read a trace saved by :meth:`save` (the ``.npz`` next to ``path``)."""
        with np.load(Path(path).with_suffix(".npz")) as z:
            meta = json.loads(str(z["meta"]))
            meta["subject_range"] = tuple(meta["subject_range"])
            return cls(scores=z["scores"], **meta)


def subject_token_range(handle, ids: Sequence[int], subject: str) -> tuple[int, int]:
    """[start, end) of the tokens that spell ``subject`` in ``ids``.

    Decodes growing prefixes (so multi-byte characters split over tokens decode correctly), finds the subject's
    character span in the decoded text and maps it back to the tokens that overlap it.
    """
    dec = handle.tokenizer.decode
    ends = [len(dec(list(ids[: i + 1]), clean_up_tokenization_spaces=False)) for i in range(len(ids))]
    text = dec(list(ids), clean_up_tokenization_spaces=False)
    start = text.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in the prompt as tokenized: {text!r}")
    stop = start + len(subject)
    b = next(i for i, end in enumerate(ends) if end > start)
    e = next(i + 1 for i, end in enumerate(ends) if end >= stop)
    return b, e


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers of a window of ``window`` layers centred on ``layer``, clipped: max(0, ℓ−w/2) … min(L, ℓ+w/2)−1."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


class Tracer:
    """A prompt prepared for tracing: clean states recorded once, fixed noise, answer chosen.

    Args:
        prompt: the prompt; a ``{}`` slot is filled with the subject.
        subject: a substring of the prompt whose embeddings are corrupted.
        samples: S, corrupted rows per restoration set.
        noise: ν (number), ``"s<k>"`` (k·σ) or None (3σ from known_1000; see ``noise.py``).
        answer: trace p(first token of this answer); default: the clean model's top prediction.
        seed: seed of ε (numpy RandomState, as ROME) so every set and every run sees the same noise.
    """

    def __init__(self, handle, prompt: str, subject: str, *, samples: int = 10, noise: float | str | None = None,
                 answer: str | None = None, seed: int = 1) -> None:
        if handle.is_encoder_decoder:
            raise ValueError(f"causal tracing supports decoder-only models; {handle.name} is an encoder-decoder "
                             "model (its answer is produced by the decoder from a cross-attended encoding)")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.handle, self.samples = handle, samples
        self.prompt = prompt.replace("{}", subject, 1) if "{}" in prompt else prompt
        self.subject = subject
        self.batch = handle.tokens.prompts([self.prompt])
        self.ids = self.batch.input_ids[0].tolist()
        self.tokens = handle.tokens.words(self.ids)
        self.subject_range = subject_token_range(handle, self.ids, subject)
        self.noise = resolve_noise(handle, noise)
        self._keep = ({"logits_to_keep": 1}
                      if "logits_to_keep" in inspect.signature(handle.model.forward).parameters else {})
        self._clean_run(answer)
        b, e = self.subject_range
        d = self.clean[handle.adapter.embed].shape[-1]
        eps = np.random.RandomState(seed).randn(samples, e - b, d)  # [S, e-b, d]
        self.eps = (self.noise * torch.from_numpy(eps)).to(handle.device, handle.dtype)
        self._low: float | None = None

    @torch.no_grad()
    def _clean_run(self, answer: str | None) -> None:
        """Record every module output tracing may restore, and choose the answer token."""
        h, ad = self.handle, self.handle.adapter
        paths = [ad.embed] + [t.format(i) for i in range(h.n_layers) for t in (ad.layers, ad.mlp, ad.attn)
                              if ad.has(h.model, t.format(i))]  # hybrid models: some layers lack a part
        with contextlib.ExitStack() as stack:
            traces = [stack.enter_context(hook_trace(h.model, p)) for p in paths]
            logits = h.model(**self.batch.model_inputs(h.device), **self._keep).logits  # [1, seq|1, vocab]
        self.clean = {p: ad.per_token(ad.hidden(t.output), 1)[0]  # each [seq, d]
                      for p, t in zip(paths, traces, strict=True)}
        probs = torch.softmax(logits[0, -1].float(), -1)  # [vocab]
        top = int(probs.argmax())
        self.answer_id = top if answer is None else h.tokens.target_ids(self.prompt, answer)[0]
        self.answer = h.tokenizer.decode([self.answer_id])
        self.correct_prediction = top == self.answer_id
        self.high_score = float(probs[self.answer_id])

    @property
    def low_score(self) -> float:
        """p(answer) with the subject corrupted and nothing restored."""
        if self._low is None:
            self._low = float(self.restore([{}])[0])
        return self._low

    def restore(self, sets: Sequence[RestorationSet], *, max_rows: int = 256, progress: bool = False) -> np.ndarray:
        """Mean p(answer) over the S corrupted rows for each restoration set, [len(sets)].

        ``max_rows`` bounds the batch: floor(max_rows / S) sets (at least one) share each forward pass.
        """
        per = max(1, max_rows // self.samples)
        chunks = [sets[i: i + per] for i in range(0, len(sets), per)]
        from tqdm.auto import tqdm

        out = [self._forward(c) for c in tqdm(chunks, desc="tracing", unit="fwd", disable=not progress, leave=False)]
        return np.concatenate(out) if out else np.zeros(0)

    @torch.no_grad()
    def _forward(self, chunk: Sequence[RestorationSet]) -> np.ndarray:
        h, ad, S = self.handle, self.handle.adapter, self.samples
        rows = len(chunk) * S
        sites: dict[str, tuple[list[int], list[int]]] = {}
        for k, rset in enumerate(chunk):
            for path, toks in rset.items():
                r, t = sites.setdefault(path, ([], []))
                for row in range(k * S, (k + 1) * S):
                    r.extend([row] * len(toks))
                    t.extend(toks)
        unknown = set(sites) - set(self.clean)
        if unknown:
            raise ValueError(f"cannot restore {sorted(unknown)}: not a recorded module output")
        b, e = self.subject_range
        noise = self.eps.repeat(len(chunk), 1, 1)  # [rows, e-b, d]

        def edit(path: str):
            idx = sites.get(path)
            r = torch.tensor(idx[0], device=h.device) if idx else None
            t = torch.tensor(idx[1], device=h.device) if idx else None

            def fn(output):
                flat = ad.hidden(output)
                x = ad.per_token(flat, rows).clone()  # [rows, seq, d]
                if path == ad.embed:  # corruption first, so restoring the embedding undoes it
                    x[:, b:e] += noise
                if r is not None:
                    x[r, t] = self.clean[path][t]
                return ad.with_hidden(output, x.view(flat.shape))

            return fn

        inputs = {k: v.expand(rows, -1) for k, v in self.batch.model_inputs(h.device).items()}
        with contextlib.ExitStack() as stack:
            for path in dict.fromkeys([ad.embed, *sites]):
                stack.enter_context(hook_trace(h.model, path, output=False, edit_output=edit(path)))
            logits = h.model(**inputs, **self._keep).logits  # [rows, seq|1, vocab]
        p = torch.softmax(logits[:, -1].float(), -1)[:, self.answer_id]  # [rows]
        return p.view(len(chunk), S).mean(1).double().cpu().numpy()

    def module_paths(self, kind: str, layer: int, window: int) -> list[str]:
        """The module outputs restored for one column: the block output, or a window of MLP / attention."""
        ad = self.handle.adapter
        if kind == "hidden":
            return [ad.layer(layer)]
        template = {"mlp": ad.mlp, "attn": ad.attn}[kind]
        paths = [template.format(j) for j in window_layers(layer, window, self.handle.n_layers)]
        return [p for p in paths if p in self.clean]  # hybrid models: layers without the part are skipped

    def token_rows(self, token_range: str | Sequence[int] | None) -> list[int]:
        """Token positions to trace: None (all), "subject", "subject_last", "last", or explicit indices."""
        n, (b, e) = len(self.ids), self.subject_range
        named = {None: range(n), "subject": range(b, e), "subject_last": [e - 1], "last": [n - 1]}
        if token_range is None or isinstance(token_range, str):
            if token_range not in named:
                raise ValueError(f"token_range {token_range!r}: use None, 'subject', 'subject_last', 'last' or indices")
            return list(named[token_range])
        rows = [int(t) for t in token_range]
        if any(not 0 <= t < n for t in rows):
            raise ValueError(f"token_range {rows} out of range for a {n}-token prompt")
        return rows

    def trace(self, kind: str = "hidden", *, window: int = 10, token_range: str | Sequence[int] | None = None,
              max_rows: int = 256, progress: bool = False) -> TraceResult:
        """The [tokens × layers] table of one kind (spec C.5)."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: use one of {KINDS}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        n_layers, rows = self.handle.n_layers, self.token_rows(token_range)
        # layer-major order: the sets sharing a forward restore the same modules
        cells = [(t, layer) for layer in range(n_layers) for t in rows]
        sets = [{p: (t,) for p in self.module_paths(kind, layer, window)} for t, layer in cells]
        probs = self.restore(sets, max_rows=max_rows, progress=progress)
        scores = np.full((len(self.ids), n_layers), np.nan)
        for (t, layer), p in zip(cells, probs, strict=True):
            scores[t, layer] = p
        return TraceResult(
            scores=scores, low_score=self.low_score, high_score=self.high_score, tokens=self.tokens,
            subject_range=self.subject_range, answer=self.answer, kind=kind,
            window=1 if kind == "hidden" else window, noise=self.noise,
            correct_prediction=self.correct_prediction, input_ids=self.ids, answer_id=self.answer_id,
            samples=self.samples, prompt=self.prompt, subject=self.subject,
        )


def trace_fact(handle, prompt: str, subject: str, *, kind: str = "hidden", samples: int = 10,
               noise: float | str | None = None, window: int = 10, answer: str | None = None,
               token_range: str | Sequence[int] | None = None, progress: bool = False,
               max_rows: int = 256, seed: int = 1) -> TraceResult:
    """Causal trace of one fact: p(answer) after restoring each (token, layer) of a corrupted run.

    See :class:`Tracer` for the arguments; ``max_rows`` bounds the rows of one batched forward.
    """
    tracer = Tracer(handle, prompt, subject, samples=samples, noise=noise, answer=answer, seed=seed)
    return tracer.trace(kind, window=window, token_range=token_range, max_rows=max_rows, progress=progress)


def trace_all(handle, prompt: str, subject: str, *, kinds: Sequence[str] = KINDS, samples: int = 10,
              noise: float | str | None = None, window: int = 10, answer: str | None = None,
              token_range: str | Sequence[int] | None = None, progress: bool = False,
              max_rows: int = 256, seed: int = 1) -> dict[str, TraceResult]:
    """:func:`trace_fact` for several kinds, sharing one clean run and one noise draw."""
    tracer = Tracer(handle, prompt, subject, samples=samples, noise=noise, answer=answer, seed=seed)
    return {k: tracer.trace(k, window=window, token_range=token_range, max_rows=max_rows, progress=progress)
            for k in kinds}
