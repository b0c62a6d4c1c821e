"""Where cells run: on this machine (``local``: in this process, or in ``workers`` processes) or on Ray
actors (``ray``).

Every way loads the model once per process and hands whole cells to :func:`~lmedit.table.runner.run_cell`,
so the numbers do not depend on the backend (each cell seeds its RNGs at its start). Local workers are
spawned processes, each with its share of the CPU threads; cells are independent, so the workers keep
every core busy, also through the single-threaded parts of a cell (Python, tokenization, small ops). On the
2-core reference machine two workers ran the default table's cells at 99% of two cores. The Ray backend starts
a local cluster of ``workers`` CPUs (``ray.init(num_cpus=workers)``)
unless given an ``address``. In both, each worker takes the next cell as it finishes the previous one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from ..metrics.evaluate import ALL_PROTOCOLS
from ..metrics.generate import GenSettings
from .cells import CellCache, CellResult, CellSpec, TableError

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What a backend reports while it works (the CLI draws bars from these; the library prints nothing)."""

    inner_bars: bool  # let run_benchmark draw its own per-case bar (local backend only)

    def cell_started(self, spec: CellSpec, n_cases: int) -> None: ...

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
    shared_requests: list[str] = field(default_factory=list)  # digests of requests that several cells edit
    protocols: tuple[str, ...] = ALL_PROTOCOLS  # scoring protocols of every cell
    generation: GenSettings = field(default_factory=GenSettings)  # how the gen protocol generates
    drift: Any = None  # DriftSettings of batch and sequential cells (None: not measured)


def safe_run(handle: ModelHandle, spec: CellSpec, opts: RunOptions, progress: Progress | None = None) -> CellResult:
    """run_cell, with 'cannot run' and failures turned into results that the table shows as '-'."""
    from ..types import EditInputError
    from .runner import CellSkipped, run_cell

    t0 = time.perf_counter()
    try:
        result = run_cell(handle, spec, CellCache(opts.out), checkpoints=opts.checkpoints, data_path=opts.data_path,
                          progress=bool(progress and progress.inner_bars),
                          reuse=opts.reuse,
                          cached_only=opts.cached_only, shared_requests=opts.shared_requests,
                          protocols=opts.protocols, generation=opts.generation, drift=opts.drift)
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


def auto_workers(n_cells: int) -> int:
    """Local worker processes when the user names none: one per CPU core (at most 4, at most one per cell);
    one on a GPU machine, whose cells share the accelerator."""
    if _cuda():
        return 1
    return max(1, min(os.cpu_count() or 1, 4, n_cells))


def worker_threads(workers: int) -> int:
    """Torch threads of each of ``workers`` local worker processes: an equal share of the CPU cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_local(specs: list[CellSpec], opts: RunOptions, progress: Progress | None = None,
              workers: int = 1) -> list[CellResult]:
    """Every cell on this machine: in this process, one after the other, on one loaded model; or, with
    ``workers`` > 1, in that many spawned processes that each load the model once and take whole cells
    (each with ``threads`` torch threads, by default an equal share of the CPU cores)."""
    if workers < 1:
        raise TableError(f"workers must be at least 1, got {workers}", option="workers")
    if workers > 1 and len(specs) > 1:
        return _run_processes(specs, opts, min(workers, len(specs)), progress)
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


_WORKER: CellWorker | None = None  # the model and options of a local worker process


def _worker_start(opts: RunOptions) -> None:
    global _WORKER
    _WORKER = CellWorker(opts)


def _worker_run(spec: CellSpec) -> tuple[dict[str, Any], bool]:
    assert _WORKER is not None, "the worker process was not initialised"
    return _WORKER.run(spec)


def _run_processes(specs: list[CellSpec], opts: RunOptions, workers: int,
                   progress: Progress | None) -> list[CellResult]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    opts = replace(opts, threads=opts.threads or worker_threads(workers))  # picklable copy
    log.info("running %d cells in %d worker processes, %d torch threads each", len(specs), workers, opts.threads)
    # spawn, not fork: a forked child would inherit this process's torch thread pool and locks
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_start, initargs=(opts,)) as pool:
        return _dispatch(specs, workers, submit=lambda _slot, spec: pool.submit(_worker_run, spec),
                         wait_any=lambda running, timeout: list(
                             wait(running, timeout=timeout, return_when=FIRST_COMPLETED).done),
                         get=lambda future: future.result(), progress=progress, cache=CellCache(opts.out))


class CellWorker:
    """A worker (a Ray actor or a local worker process): loads the model once, then runs whole cells on it."""

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
        raise ImportError("the ray backend needs Ray: pip install ray  (or use the local backend)") from e
    return ray


def run_ray(specs: list[CellSpec], opts: RunOptions, *, workers: int = 2, address: str | None = None,
            progress: Progress | None = None) -> list[CellResult]:
    """Cells on Ray actors (a local cluster of ``workers`` CPUs unless ``address`` names one)."""
    ray = _ray()
    if workers < 1:
        raise TableError(f"workers must be at least 1, got {workers}", option="workers")
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
        return _dispatch(specs, len(pool), submit=lambda slot, spec: pool[slot].run.remote(spec),
                         wait_any=lambda running, timeout: ray.wait(running, num_returns=1, timeout=timeout)[0],
                         get=ray.get, progress=progress, cache=CellCache(opts.out))
    finally:
        if started:
            ray.shutdown()


def cell_cost(spec: CellSpec) -> float:
    """A rough cost of a cell for ordering: cases x edits per case (the dataset's ``requests_per_case``) x the
    method's ``relative_cost``."""
    from ..registry import editor_class
    from .runner import requests_per_case

    try:
        per_case = float(editor_class(spec.method).relative_cost)
    except Exception:  # noqa: BLE001  (an unknown method fails in its own cell, not here)
        per_case = 1.0
    return spec.n * requests_per_case(spec.dataset) * per_case


def start_order(specs: list[CellSpec]) -> list[tuple[int, CellSpec]]:
    """(index, spec) in the order workers that share the cells start them: the longest first; among equal
    ones, the first dataset's cells of every method before the next dataset's, so that a method's cells that
    edit the same facts (ZsRE and its portability slice) run one after the other and the later one takes
    the stored edits of the earlier."""
    rank = {ds: i for i, ds in enumerate(dict.fromkeys(s.dataset for s in specs))}
    return sorted(enumerate(specs), key=lambda item: (-cell_cost(item[1]), rank[item[1].dataset]))


def _cases_done(cache: CellCache, spec: CellSpec) -> int:
    """Finished cases of a running cell, counted from its cases.jsonl files (the workers share the disk)."""
    n = 0
    for f in cache.folder(spec).glob("run-*/cases.jsonl"):
        try:
            n += f.read_bytes().count(b"\n")
        except OSError:  # being rewritten by the worker right now
            pass
    return n


def _dispatch(specs: list[CellSpec], slots: int, *, submit: Callable[[int, CellSpec], Any],
              wait_any: Callable[[list[Any], float], list[Any]], get: Callable[[Any], tuple[dict[str, Any], bool]],
              progress: Progress | None, cache: CellCache) -> list[CellResult]:
    """Give each idle worker slot the next cell until all are done, longest first (so that no long cell
    starts last, while the other workers sit idle); results in spec order.

    ``submit(slot, spec)`` starts a cell and returns a handle (a Ray object ref, a future); ``wait_any``
    returns the handles finished within a timeout; ``get`` a finished handle's (result dict, cached flag).
    A worker that dies (out of memory, killed) fails its cell, not the table.
    """
    queue = start_order(specs) if slots > 1 else list(enumerate(specs))
    running: dict[Any, tuple[int, int]] = {}
    out: list[CellResult | None] = [None] * len(specs)

    def start(slot: int) -> None:
        i, spec = queue.pop(0)
        running[submit(slot, spec)] = (i, slot)
        if progress:
            progress.cell_started(spec, spec.n)

    for slot in range(slots):
        if queue:
            start(slot)
    while running:
        done = wait_any(list(running), 2.0)
        if not done:
            if progress:  # cases finished so far in each running cell (local workers share the disk)
                progress.status(", ".join(f"{specs[i].name} {_cases_done(cache, specs[i])}/{specs[i].n}"
                                          for i, _ in running.values()))
            continue
        for handle in done:
            i, slot = running.pop(handle)
            try:
                body, cached = get(handle)
                result = CellResult.from_dict(body, specs[i])
                result.cached = cached
            except Exception as e:  # noqa: BLE001  (the worker itself died: this cell fails, the others go on)
                log.error("cell %s: its worker failed: %s", specs[i].name, e)
                result = CellResult(specs[i], "failed", f"the worker running {specs[i].name} died: "
                                                        f"{type(e).__name__}: {e}")
            out[i] = result
            if progress:
                progress.cell_done(result)
            if queue:
                start(slot)
    return [r for r in out if r is not None]
