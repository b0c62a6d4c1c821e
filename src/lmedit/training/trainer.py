"""A generic meta-training loop for trained editors (MEND, KE, SERAC).

The method supplies an :class:`Objective` (its networks, a training loss on a batch of
:class:`~lmedit.training.data.TrainExample` and a validation pass); the loop supplies batching, Adam,
gradient clipping, a progress bar (edit accuracy, locality KL), validation on a held-back slice, early stop
on a plateau, and resumable checkpoints (``train.*`` every ``val_every`` steps, ``best.*``, final
``editor.*``). Batches are a pure function of (seed, step), so a resumed run continues exactly where the
last checkpoint was written: an interruption loses at most one checkpoint interval.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from . import checkpoint as ckpt
from .data import TrainExample, batch_for_step, val_batches

log = logging.getLogger(__name__)

# fields that may change between a run and its resumption (how long to train, where to load from)
RESUMABLE_CHANGES = frozenset({"steps", "patience", "checkpoint", "val_every", "val_batches"})


class Objective(Protocol):
    """What a trained editor gives the loop."""

    def param_groups(self) -> list[dict[str, Any]]: ...
    def train_step(self, batch: list[TrainExample]) -> tuple[torch.Tensor, dict[str, float]]: ...
    def val_step(self, batch: list[TrainExample]) -> dict[str, float]: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...
    # Optional: ``after_step()``, called after each optimiser step (KE keeps its multiplier >= 0 there); a param
    # group with ``"clip": False`` is left out of the clipped gradient norm (a Lagrange multiplier's gradient).
    # Optional: ``constraint_violation(val_metrics) -> float`` (0 when a constraint of the method holds, e.g.
    # KE's locality KL <= m_KL). The best checkpoint is then a feasible one when any validation was feasible:
    # feasible beats infeasible, a smaller violation beats a larger one, and the loss breaks ties.


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    val_every: int
    val_batches: int
    patience: int
    seed: int = 0
    grad_clip: float = 100.0
    max_seconds: float = 0.0  # wall-clock budget of this run (0: none); it ends with a validation + checkpoint


@dataclass
class TrainResult:
    steps_done: int
    best_val: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Runs an :class:`Objective` for ``settings.steps`` steps (see the module docstring).

    Args:
        info: JSON facts written into every checkpoint (method, model name and fingerprint, config).
        out: output directory (None: train in memory only, no checkpoints).
        progress: show a tqdm bar on stderr (the CLI turns it on; library callers usually do not).
        on_step: called as ``on_step(step, metrics)`` after every step (tests use it to interrupt).
    """

    def __init__(self, objective: Objective, settings: TrainSettings, info: dict[str, Any], *,
                 out: str | Path | None = None, progress: bool = False, on_step: Any = None) -> None:
        self.obj = objective
        self.s = settings
        self.info = info
        self.out = Path(out) if out is not None else None
        self.progress = progress
        self.on_step = on_step
        self.opt = torch.optim.Adam(objective.param_groups())
        self.step = 0
        self.best_val = float("inf")
        self.best_violation = 0.0
        self.bad_vals = 0
        self.history: list[dict[str, float]] = []
        self._best_state: dict[str, torch.Tensor] | None = None

    # --- checkpoints -------------------------------------------------------------------------------
    def _save_train(self) -> None:
        if self.out is None:
            return
        opt_t, opt_info = ckpt.optimizer_tensors(self.opt)
        tensors = {**{f"editor.{k}": v for k, v in self.obj.state_tensors().items()},
                   **{f"optim.{k}": v for k, v in opt_t.items()}}
        ckpt.write(self.out, ckpt.TRAIN, tensors, {
            **self.info, "step": self.step, "best_val": self.best_val, "best_violation": self.best_violation,
            "bad_vals": self.bad_vals,
            "history": self.history, "optimizer": opt_info})

    def _save_best(self) -> None:
        self._best_state = {k: v.detach().clone() for k, v in self.obj.state_tensors().items()}
        if self.out is not None:
            ckpt.write(self.out, ckpt.BEST, self._best_state, {**self.info, "step": self.step,
                                                                "best_val": self.best_val,
                                                                "best_violation": self.best_violation})

    def resume(self) -> None:
        """Load ``train.*`` from ``out`` (refusing another method, model or incompatible config)."""
        if self.out is None:
            raise ValueError("resume needs an output directory (out=...) holding a previous run")
        info, tensors = ckpt.read(self.out, ckpt.TRAIN, method=self.info["method"],
                                  fingerprint=self.info["model_fingerprint"], model_name=self.info["model_name"])
        old, new = info.get("config", {}), self.info.get("config", {})
        diff = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
        if diff:
            raise ckpt.CheckpointError(
                f"cannot resume {self.out}: its editor config differs in {diff} "
                f"({ {k: old.get(k) for k in diff} } there, { {k: new.get(k) for k in diff} } now); "
                "use the same settings, or start a new run in another output directory", option="out")
        self.obj.load_state_tensors(ckpt.split_prefix(tensors, "editor"))
        ckpt.load_optimizer(self.opt, ckpt.split_prefix(tensors, "optim"), info["optimizer"])
        self.step, self.best_val = int(info["step"]), float(info["best_val"])
        self.bad_vals, self.history = int(info.get("bad_vals", 0)), list(info.get("history", []))
        self.best_violation = float(info["best_violation"]) if "best_violation" in info else \
            self._violation_of_best()  # a checkpoint written before constraints decided the best
        try:
            _, best = ckpt.read(self.out, ckpt.BEST, method=self.info["method"],
                                fingerprint=self.info["model_fingerprint"], model_name=self.info["model_name"])
            self._best_state = best
        except FileNotFoundError:
            self._best_state = None
        log.info("resumed %s at step %d (best validation loss %.4g)", self.out, self.step, self.best_val)

    # --- loop --------------------------------------------------------------------------------------
    def validate(self, val: list[TrainExample]) -> dict[str, float]:
        sums: dict[str, float] = {}
        batches = val_batches(val, self.s.batch_size, self.s.val_batches)
        for b in batches:
            for k, v in self.obj.val_step(b).items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / max(1, len(batches)) for k, v in sums.items()}

    def run(self, train: list[TrainExample], val: list[TrainExample]) -> TrainResult:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.s.steps, initial=self.step, disable=not self.progress, desc="training",
                   dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        stopped = False
        t0 = time.perf_counter()
        try:
            while self.step < self.s.steps:
                batch = batch_for_step(train, self.step, self.s.batch_size, self.s.seed)
                self.opt.zero_grad(set_to_none=True)
                loss, metrics = self.obj.train_step(batch)
                loss.backward()
                params = [p for g in self.opt.param_groups if g.get("clip", True) for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.s.grad_clip)
                self.opt.step()
                if hasattr(self.obj, "after_step"):
                    self.obj.after_step()
                self.step += 1
                for k, v in {"loss": loss.item(), **metrics}.items():
                    window.setdefault(k, []).append(v)
                bar.update(1)
                bar.set_postfix({k: f"{sum(v[-20:]) / len(v[-20:]):.3g}" for k, v in window.items()
                                 if k in ("loss", "edit_acc", "loc_kl")})
                if self.on_step is not None:
                    self.on_step(self.step, metrics)
                out_of_time = self.s.max_seconds > 0 and time.perf_counter() - t0 > self.s.max_seconds
                if self.step % self.s.val_every == 0 or self.step == self.s.steps or out_of_time:
                    stopped = self._end_interval(window, val, time.perf_counter() - t0)
                    window = {}
                    if stopped or out_of_time:
                        if out_of_time:
                            log.info("time budget of %.0f s used at step %d", self.s.max_seconds, self.step)
                        break
        finally:
            bar.close()
        if self._best_state is not None:
            self.obj.load_state_tensors(self._best_state)
        return TrainResult(self.step, self.best_val, stopped, self.history)

    def _end_interval(self, window: dict[str, list[float]], val: list[TrainExample], seconds: float) -> bool:
        rec = {"step": self.step, "seconds": round(seconds, 2)}
        rec.update({f"train_{k}": sum(v) / len(v) for k, v in window.items() if v})
        if val:
            rec.update({f"val_{k}": v for k, v in self.validate(val).items()})
        self.history.append(rec)
        score = rec.get("val_loss", rec.get("train_loss", float("inf")))
        violation = self._violation(rec)
        if violation is not None:
            rec["violation"] = violation
        if self._improves(violation or 0.0, score):
            self.best_val, self.best_violation, self.bad_vals = score, violation or 0.0, 0
            self._save_best()
        else:
            self.bad_vals += 1
        log.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "step"))
        self._save_train()
        if self.s.patience > 0 and self.bad_vals >= self.s.patience:
            log.info("early stop at step %d: validation loss has not improved for %d validations",
                     self.step, self.bad_vals)
            return True
        return False

    def _violation_of_best(self) -> float:
        """The constraint violation of the best validation in the history (the one with the best loss)."""
        recs = [r for r in self.history if r.get("val_loss", r.get("train_loss")) == self.best_val]
        return (self._violation(recs[0]) or 0.0) if recs else 0.0

    def _violation(self, rec: dict[str, float]) -> float | None:
        """How far the validated editor is from its method's constraint (None: the method has none)."""
        fn = getattr(self.obj, "constraint_violation", None)
        if fn is None:
            return None
        prefix = "val_" if any(k.startswith("val_") for k in rec) else "train_"
        metrics = {k[len(prefix):]: v for k, v in rec.items() if k.startswith(prefix)}
        return max(0.0, float(fn(metrics)))

    def _improves(self, violation: float, score: float) -> bool:
        """Is this validation better than the best so far? Feasible first, then smaller violation, then loss."""
        if self.best_val == float("inf"):
            return True
        if violation != self.best_violation and (violation > 0 or self.best_violation > 0):
            return violation < self.best_violation
        return score < self.best_val - 1e-6 * max(1.0, abs(self.best_val))
