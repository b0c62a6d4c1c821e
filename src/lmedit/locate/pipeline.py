"""What every locate-then-edit editor shares: its config fields, layer and λ defaults, the batch (MEMIT-style)
multi-layer loop, temporary application of updates, and turning [out, in] factors into a WeightDelta.

MEMIT (Meng et al. 2023, Alg. 1), also used by EMMET, AlphaEdit and PMET with their own solver and spread:
  z_i = v* at the last edited layer ℓ_L (values.py); then for ℓ_1 < … < ℓ_L:
  K_ℓ = template-averaged keys with the updates so far applied, H = current output at ℓ_L of the plain
  prompts, R = spread(Z − H, L − i), ΔW_ℓ = solve(K_ℓ, R), W_ℓ ← W_ℓ + ΔW_ℓ (temporarily: every weight is
  restored bit-exactly before returning).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..config import Config, ConfigError, RunOptions, option
from ..digests import tensor_digest
from ..edits import WeightDelta
from ..hooks import get_module, get_parameter
from ..models.adapter import UnsupportedArchitectureError
from ..types import EditRequest
from .keys import gather, request_rows
from .templates import TemplateGroups, context_templates, flatten, group_mean
from .values import ValueOptions, ValueResult, optimize_values, site_path

log = logging.getLogger(__name__)

# λ of EasyEdit's MEMIT/PMET presets, tuned for Llama-2-7B's MLP width. For a key drawn from the corpus,
# E[kᵀC⁻¹k] = tr(C⁻¹C) = d_ff: the edit term K Kᵀ grows with the width relative to C, so λ must too.
ROW_BATCH = 8  # requests whose values are optimised together when RunOptions.row_batch is not set
REFERENCE_LAMBDA = 15000.0
REFERENCE_WIDTH = 11008

# Adam steps of the value optimisation in the SmolLM2 presets. 25 (the Llama presets' number) leaves long
# targets unfitted: MEMIT on the first 32 ZsRE eval cases ended 14 of them at value loss 0.5-2.8 and scored
# rel/gen 86/68 (97/83 with 50); ROME on 20 cases went from 71.5/61.8 (25 steps) to 93.7/79.2. Early stopping
# (loss < 0.05) keeps easy edits short.
SMOLLM2_VALUE_STEPS = 50


@dataclass
class LocateConfig(Config):
    """Fields shared by ROME, MEMIT, EMMET, AlphaEdit and PMET; each method's Config extends it."""

    moved: ClassVar[dict[str, str]] = {"value_cache": "value_cache", "v_batch_size": "row_batch"}

    layers: list[int] | Literal["auto"] | None = option(
        None, "layers whose W_out is rewritten (None: chosen from the depth; 'auto': the causal-tracing peak)")
    v_num_grad_steps: int = option(25, "steps (forward passes) of the value optimisation")
    v_lr: float = option(0.5, "Adam learning rate of the value optimisation")
    v_weight_decay: float = option(1e-3, "weight of ‖δ‖/‖v₀‖² in the value loss")
    clamp_norm_factor: float = option(4.0, "‖δ‖ is kept ≤ clamp_norm_factor·‖v₀‖")
    kl_factor: float = option(0.0625, "weight of the KL term on '{subject} is a'")
    v_early_stop: float = option(0.05, "stop a value's optimisation once its loss is below this (0: every step)",
                                 added=True)
    v_optimizer: Literal["adam", "lbfgs"] = option(
        "adam", "optimiser of the value optimisation: 'adam' (the papers'), or 'lbfgs' (L-BFGS with a backtracking "
        "line search, one forward per step; reaches the early-stop loss in fewer steps; v_lr sets its first step)",
        added=True)
    v_matmuls: Literal["model", "bf16"] = option(
        "model", "precision of the value optimisation's matrix products: 'model' (the model's own dtype), or "
        "'bf16' (bfloat16 copies of the weights above the edit site, made once per optimisation: about 2x faster "
        "products on a CPU with AVX-512 BF16; a value stops only once the model's own weights confirm its loss)",
        added=True)
    answer_end: str = option(
        "", "text the value optimisation also teaches right after the new answer, e.g. '\\n': the edited model "
        "states the answer and ends its line instead of running on ('': the answer alone, as the papers)", added=True)
    mom2_tokens: int = option(100_000, "corpus tokens for the key second moment C = E[k kᵀ]")
    mom2_corpus: str | None = option(None, "text file or folder for C (None: WikiText, see lmedit.locate.stats)")
    context_lengths: list[list[int]] = option([[10, 5]], "context templates: [total tokens, samples] pairs")
    seed: int = option(0, "seed of the context-template sampler")

    def validate(self) -> None:
        for name in ("v_num_grad_steps", "mom2_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.v_early_stop < 0:
            raise ConfigError(f"v_early_stop must be ≥ 0, got {self.v_early_stop}")
        if self.clamp_norm_factor <= 0:
            raise ConfigError(f"clamp_norm_factor must be > 0, got {self.clamp_norm_factor}")


class Phases:
    """Wall time per named phase of an edit (``with clock("values"): ...``), summed into ``seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def mlp_width(handle, layer: int) -> int:
    """d_ff: the input width of W_out, read from the weight (never from the model name)."""
    return int(handle.adapter.weight_out_in(get_module(handle.model, handle.adapter.mlp_out.format(layer))).shape[1])


def width_lambda(handle, layer: int, reference: float = REFERENCE_LAMBDA, width: int = REFERENCE_WIDTH) -> float:
    """λ scaled with the MLP width: reference·d_ff/width (SmolLM2, d_ff 1536: 15000·1536/11008 ≈ 2093)."""
    return reference * mlp_width(handle, layer) / width


def depth_layers(handle, center: float, count: int) -> list[int]:
    """``count`` consecutive layers centred at ``center`` of the depth, clipped to the model."""
    n = handle.n_layers
    mid = min(n - 1, max(0, round(center * (n - 1))))
    lo = max(0, min(mid - count // 2, n - count))
    return list(range(lo, min(n, lo + count)))


def value_options(cfg: Any) -> ValueOptions:
    return ValueOptions(steps=cfg.v_num_grad_steps, lr=cfg.v_lr, weight_decay=cfg.v_weight_decay,
                        clamp=cfg.clamp_norm_factor, kl_factor=cfg.kl_factor, early_stop=cfg.v_early_stop,
                        confident_stop=getattr(cfg, "confident_stop", False), optimizer=cfg.v_optimizer,
                        answer_end=getattr(cfg, "answer_end", ""), matmuls=getattr(cfg, "v_matmuls", "model"))


def check_layers(handle, layers: Sequence[int]) -> list[int]:
    if not layers:
        raise ConfigError("layers is empty; give at least one layer to edit")
    handle.adapter.check_layers(handle.model, list(layers))
    return sorted(int(x) for x in layers)


def param_name(handle, layer: int) -> str:
    return handle.adapter.mlp_out.format(layer) + ".weight"


def param_factors(handle, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ΔW = a bᵀ ([out, in]) in the parameter's stored layout (Conv1D stores [in, out])."""
    a, b = a.float().contiguous(), b.float().contiguous()
    return (b, a) if handle.adapter.weight_layout == "in_out" else (a, b)


@contextlib.contextmanager
def temporarily_applied(handle) -> Iterator[Callable[[int, torch.Tensor, torch.Tensor], None]]:
    """Yields ``add(layer, a, b)`` which adds a bᵀ to W_out of ``layer``; every touched weight is restored."""
    originals: dict[str, torch.Tensor] = {}

    def add(layer: int, a: torch.Tensor, b: torch.Tensor) -> None:
        name = param_name(handle, layer)
        p = get_parameter(handle.model, name)
        originals.setdefault(name, p.detach().clone())
        pa, pb = param_factors(handle, a, b)
        with torch.no_grad():
            p.copy_((p.float() + pa.to(p.device) @ pb.to(p.device).T).to(p.dtype))

    try:
        yield add
    finally:
        with torch.no_grad():
            for name, orig in originals.items():
                get_parameter(handle.model, name).copy_(orig)


def weight_delta(handle, factors: dict[int, tuple[torch.Tensor, torch.Tensor]], stats: dict[str, Any]
                 ) -> WeightDelta:
    """A WeightDelta of low-rank factors per layer, with base digests and ‖ΔW‖/‖W‖ in meta["stats"]."""
    deltas, digests, rel = {}, {}, {}
    for layer, (a, b) in factors.items():
        name = param_name(handle, layer)
        p = get_parameter(handle.model, name)
        deltas[name] = param_factors(handle, a, b)
        digests[name] = tensor_digest(p)
        rel[name] = float((a.double() @ b.double().T).norm() / p.double().norm())
        log.info("‖ΔW‖/‖W‖ at %s: %.4g", name, rel[name])
    return WeightDelta(deltas, digests, meta={"stats": {"relative_norm": rel, **stats}})


def batch_update(handle, requests: Sequence[EditRequest], layers: Sequence[int], targets: torch.Tensor,
                 site: str, groups: TemplateGroups, solve: Callable, spread_rule: str = "linear",
                 keys_after: bool = False, clock: Phases | None = None
                 ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict]:
    """The multi-layer loop of the module docstring. targets: Z [B, d] at ``site`` of the last layer.

    ``solve(layer, K [d_ff, B], R [d, B]) -> (a, b)``. Returns the factors per layer and info (the
    residual norms; with ``keys_after`` the keys {layer: [d_ff, B]} of the fully edited model).
    """
    from .solvers import spread

    rows = request_rows(handle.tokens, requests, groups)
    _, gid = flatten(groups)
    n_t = len(gid)
    z_point = (site_path(handle.adapter, site, layers[-1]), "output")
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    info: dict[str, Any] = {"residual_norm": []}
    clock = clock or Phases()
    with temporarily_applied(handle) as add:
        for i, layer in enumerate(layers):
            with clock("keys"):
                k_all, h_all = gather(handle, rows, [(handle.adapter.mlp_out.format(layer), "input"), z_point])
            K = torch.stack([group_mean(k, gid) for k in k_all.view(len(requests), n_t, -1)]).T  # [d_ff, B]
            H = h_all.view(len(requests), n_t, -1)[:, 0]  # [B, d]: template 0 is the plain prompt
            R = spread((targets - H).T, len(layers) - i, spread_rule)  # [d, B]
            info["residual_norm"].append(float((targets - H).norm(dim=-1).mean()))
            with clock("solve"):
                a, b = solve(layer, K, R)
            factors[layer] = (a, b)
            add(layer, a, b)
        if keys_after:
            got = gather(handle, rows, [(handle.adapter.mlp_out.format(x), "input") for x in layers])
            info["keys_after"] = {x: torch.stack([group_mean(k, gid) for k in g.view(len(requests), n_t, -1)]).T
                                  for x, g in zip(layers, got, strict=True)}
    return factors, info


def target_values(handle, requests: Sequence[EditRequest], layer: int, sites: Sequence[str],
                  groups: TemplateGroups, cfg: Any, run: RunOptions | None = None) -> list[ValueResult]:
    """The optimised values of ``requests`` at ``layer`` (``run.row_batch`` at a time), taken from and kept in
    ``run.value_cache`` when it is set (each value as soon as it is final, so a stopped run resumes)."""
    opts = value_options(cfg)
    run = run or RunOptions()
    rows = run.row_batch or ROW_BATCH
    if not run.value_cache:
        return optimize_values(handle, requests, layer, sites, groups, opts, batch_size=rows)
    from .value_store import ValueStore

    store = ValueStore(run.value_cache)
    scope = store.scope(handle, layer, sites, opts, groups)
    got = [store.get(scope, r) for r in requests]
    missing = [i for i, v in enumerate(got) if v is None]
    if len(missing) < len(requests):
        log.info("%d of %d target values taken from %s", len(requests) - len(missing), len(requests),
                 run.value_cache)

    def keep(j: int, value: ValueResult) -> None:
        got[missing[j]] = value
        store.put(scope, requests[missing[j]], value)

    optimize_values(handle, [requests[i] for i in missing], layer, sites, groups, opts,
                    batch_size=rows, done=keep)
    return got  # type: ignore[return-value]


def templates_for(handle, cfg: LocateConfig) -> TemplateGroups:
    return context_templates(handle, [tuple(x) for x in cfg.context_lengths], seed=cfg.seed)


@dataclass
class BatchConfig(LocateConfig):
    """LocateConfig plus λ, for the MEMIT-style editors."""

    mom2_update_weight: float | None = option(
        None, "λ, weight of the preserved-key term λC (None: 15000·d_ff/11008, scaled with the MLP width)")


def auto_layers(handle, count: int, name: str) -> list[int]:
    """``count`` consecutive layers with the largest causal effect of the MLP at the last subject token
    (causal tracing on known facts; cached per model, see ``lmedit.tracing.suggest_layers``)."""
    from ..tracing import suggest_layers

    found = suggest_layers(handle, progress=True)
    layers = [handle.adapter.nearest_ffn_layer(found.layer)] if count == 1 else found.span(min(count, handle.n_layers))
    log.info("%s: layers=auto -> %s (MLP indirect-effect peak at layer %d over %d known facts)", name, layers,
             found.layer, found.evidence.n_facts)
    return layers


def resolve_batch(handle, cfg: Any, name: str, center: float = 0.17, count: int = 5,
                  reference: float = REFERENCE_LAMBDA, width: int = REFERENCE_WIDTH) -> Any:
    """Fill layers (``count`` layers around ``center`` of the depth, or the tracing peak for 'auto') and λ
    (width rule) when not given."""
    if cfg.layers == "auto":
        cfg = cfg.replace(layers=auto_layers(handle, count, name))
    if cfg.layers is None:
        cfg = cfg.replace(layers=depth_layers(handle, center, count))
        log.info("%s: no preset for %s; editing layers %s (around %.0f%% of the depth)", name, handle.name,
                 cfg.layers, 100 * center)
    check_layers(handle, cfg.layers)
    if getattr(cfg, "mom2_update_weight", 0.0) is None:
        lam = width_lambda(handle, cfg.layers[0], reference, width)
        cfg = cfg.replace(mom2_update_weight=round(lam, 1))
        log.info("%s: λ = %.1f (= %g·d_ff/%d)", name, lam, reference, width)
    return cfg


def memit_family(handle, requests: Sequence[EditRequest], cfg: Any, solve: Callable, *, site: str = "layer",
                 sites: Sequence[str] | None = None, spread_rule: str = "linear", keys_after: bool = False,
                 run: RunOptions | None = None) -> tuple[WeightDelta, dict]:
    """z at the last layer, then the multi-layer loop with ``solve(layer, K, R, C) -> (a, b)``; ``run``: the
    editor's run options (value store, row batch)."""
    from .stats import second_moments

    layers = check_layers(handle, cfg.layers)
    if handle.adapter.residual_streams > 1:
        raise UnsupportedArchitectureError(
            f"{type(handle.model).__name__} carries {handle.adapter.residual_streams} residual streams between its "
            "blocks (hyper-connections), so a layer's output is not the one d-vector that the edited projections "
            "add to, and the residual target cannot be spread over layers; edit one layer with ROME or FT")
    clock = Phases()
    with clock("templates"):
        groups = templates_for(handle, cfg)
    with clock("statistics"):
        C = second_moments(handle, layers, tokens=cfg.mom2_tokens, corpus=cfg.mom2_corpus)
    with clock("values"):
        values = target_values(handle, requests, layers[-1], sites or [site], groups, cfg, run)
    Z = torch.stack([v.target(site) for v in values])  # [B, d]
    factors, info = batch_update(handle, requests, layers, Z, site, groups,
                                 lambda layer, K, R: solve(layer, K, R, C[layer]), spread_rule, keys_after, clock)
    stats = {"value_loss": [v.losses[-1] for v in values], "residual_norm": info["residual_norm"],
             "seconds": clock.seconds}
    return weight_delta(handle, factors, stats), info
