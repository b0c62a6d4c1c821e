"""Where cells run: in this process (``local``) or on Ray actors (``ray``).

Both load the model once per process and hand whole cells to :func:`~lmedit.table.runner.run_cell`, so the
numbers do not depend on the backend (each cell seeds its RNGs at its start). The Ray backend starts a
local cluster of ``workers`` CPUs (``ray.init(num_cpus=workers)``) unless given an ``address``; each actor
loads the model once and takes cells from a queue as it finishes the previous one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .cells import CellCache, CellResult, CellSpec

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What a backend reports while it works (the CLI draws bars from these; the library prints nothing)."""

    inner_bars: bool  # let run_benchmark draw its own per-case bar (local backend only)

    def cell_started(self, spec: CellSpec, n_cases: int) -> None: ...

    def case_done(self) -> None: ...

    def cell_done(self, result: CellResult) -> None: ...

    def status(self, text: str) -> None: ...


@dataclass
class RunOptions:
    """What every cell of one table shares besides its spec."""

    model: str
    out: str
    checkpoints: dict[str, str] = field(default_factory=dict)
    data_path: str | None = None
    threads: int | None = None
    reuse: list[str] = field(default_factory=list)  # earlier bench runs whose finished cases cells may take
    cached_only: bool = False  # lay out the finished cells; compute nothing


def safe_run(handle: Any, spec: CellSpec, opts: RunOptions, progress: Progress | None = None) -> CellResult:
    """run_cell, with 'cannot run' and failures turned into results that the table shows as '-'."""
    from ..types import EditInputError
    from .runner import CellSkipped, run_cell

    t0 = time.perf_counter()
    try:
        result = run_cell(handle, spec, CellCache(opts.out), checkpoints=opts.checkpoints, data_path=opts.data_path,
                          progress=bool(progress and progress.inner_bars),
                          on_case=progress.case_done if progress else None, reuse=opts.reuse,
                          cached_only=opts.cached_only)
    except CellSkipped as e:
        result = CellResult(spec, "skipped", str(e))
    except EditInputError as e:  # e.g. a method that cannot edit this architecture or these requests
        log.warning("cell %s cannot run: %s", spec.name, e)
        result = CellResult(spec, "skipped", f"{spec.method} cannot edit these cases on this model: {e}")
    except Exception as e:  # noqa: BLE001  (one broken cell must not cost the rest of the table)
        log.exception("cell %s failed", spec.name)
        result = CellResult(spec, "failed", f"{spec.method} failed on {spec.dataset}: {type(e).__name__}: {e}")
    result.info.setdefault("wall_seconds", time.perf_counter() - t0)
    return result


def _load(model: str, threads: int | None) -> Any:
    import torch

    from ..models.loading import load_model

    if threads:
        torch.set_num_threads(threads)
    return load_model(model)


def run_local(specs: list[CellSpec], opts: RunOptions, progress: Progress | None = None) -> list[CellResult]:
    """Every cell in this process, one after the other, on one loaded model."""
    handle = _load(opts.model, opts.threads)
    results = []
    for spec in specs:
        if progress:
            progress.cell_started(spec, spec.n)
        result = safe_run(handle, spec, opts, progress)
        if progress:
            progress.cell_done(result)
        results.append(result)
    return results


class CellWorker:
    """A Ray actor body: loads the model once, then runs whole cells on it."""

    def __init__(self, opts: RunOptions) -> None:
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.opts = opts
        self.handle = _load(opts.model, opts.threads or 1)

    def run(self, spec: CellSpec) -> tuple[dict[str, Any], bool]:
        result = safe_run(self.handle, spec, self.opts)
        return result.to_dict(), result.cached


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError("the ray backend needs Ray: pip install ray  (or use --backend local)") from e
    return ray


def run_ray(specs: list[CellSpec], opts: RunOptions, *, workers: int = 2, address: str | None = None,
            progress: Progress | None = None) -> list[CellResult]:
    """Cells on Ray actors (a local cluster of ``workers`` CPUs unless ``address`` names one)."""
    ray = _ray()
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     object_store_memory=100 * 1024 * 1024)
        started = True
    try:
        actor = ray.remote(num_cpus=1)(CellWorker)
        pool = [actor.remote(opts) for _ in range(min(workers, len(specs)) or 1)]
        return _dispatch(ray, pool, specs, progress, CellCache(opts.out))
    finally:
        if started:
            ray.shutdown()


def _cases_done(cache: CellCache, spec: CellSpec) -> int:
    """Finished cases of a running cell, counted from its cases.jsonl files (the workers share the disk)."""
    n = 0
    for f in cache.folder(spec).glob("run-*/cases.jsonl"):
        try:
            n += f.read_bytes().count(b"\n")
        except OSError:  # being rewritten by the worker right now
            pass
    return n


def _dispatch(ray: Any, pool: list[Any], specs: list[CellSpec], progress: Progress | None,
              cache: CellCache) -> list[CellResult]:
    """Give each idle actor the next cell until all are done; results in spec order."""
    queue = list(enumerate(specs))
    running: dict[Any, tuple[int, Any]] = {}
    out: list[CellResult | None] = [None] * len(specs)

    def submit(a: Any) -> None:
        i, spec = queue.pop(0)
        running[a.run.remote(spec)] = (i, a)
        if progress:
            progress.cell_started(spec, spec.n)

    for a in pool:
        if queue:
            submit(a)
    while running:
        done, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
        if not done:
            if progress:  # cases finished so far in each running cell (a local cluster shares the disk)
                progress.status(", ".join(f"{specs[i].name} {_cases_done(cache, specs[i])}/{specs[i].n}"
                                          for i, _ in running.values()))
            continue
        i, a = running.pop(done[0])
        body, cached = ray.get(done[0])
        result = CellResult.from_dict(body, specs[i])
        result.cached = cached
        out[i] = result
        if progress:
            progress.cell_done(result)
        if queue:
            submit(a)
    return [r for r in out if r is not None]
