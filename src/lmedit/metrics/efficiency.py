"""Efficiency of one block of work: wall-clock seconds, CPU memory (RSS) and CUDA memory (methods-spec A.5).

    with measure() as m:
        edit = editor.compute(handle, requests)
    m.seconds, m.peak_rss_bytes, m.rss_delta_bytes, m.cuda_peak_bytes

Peak RSS is the larger of two readings:
- a background thread samples the process's resident set size every ``interval`` seconds (5 ms by
  default; from ``/proc/self/statm`` on Linux, else ``psutil`` if installed), so short spikes between two
  samples can be missed;
- ``getrusage(RUSAGE_SELF).ru_maxrss``, the lifetime peak of the process, used only when it *rose during
  the block* (then that new peak was reached inside the block; otherwise it dates from earlier work and says
  nothing about this block).
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start (None without
CUDA). It counts every live tensor allocated by PyTorch (the model's weights included; ``cuda_start_bytes``
says how much was already allocated at the start), not the caching allocator's reserve.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

_TRIM: Any = None  # glibc's malloc_trim, looked up on first use; False where there is none


def release_freed_memory() -> bool:
    """Hand the C heap's freed pages back to the system (glibc's ``malloc_trim(0)``; elsewhere nothing).

    Editing one fact after another frees and allocates many tensors of varying sizes, and glibc keeps the
    freed memory in its heap: a sequential MEMIT run on SmolLM2 grew by about 30 MB of resident memory per
    edit (9 GB after 285 edits) while its live tensors grew by 0.7 MB, and with a trim after each edit it
    stayed flat (docs/reliability.md). Returns whether a trim ran."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else False
        except (OSError, AttributeError):
            _TRIM = False
    if not _TRIM:
        return False
    _TRIM(0)
    return True


@dataclass
class Measurement:
    """What :func:`measure` saw. Fields are filled when the block exits."""

    seconds: float = 0.0
    peak_rss_bytes: int | None = None  # max RSS during the block (see the module docstring)
    rss_delta_bytes: int | None = None  # RSS after minus RSS before
    rss_start_bytes: int | None = None  # RSS when the block started (peak minus this: the block's own working memory)
    cuda_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated during the block
    cuda_start_bytes: int | None = None  # torch.cuda.memory_allocated when the block started
    rss_samples: int = 0  # how many background samples were taken

    def to_dict(self) -> dict[str, float | int | None]:
        """The measurement as a plain dict (the keys are the field names)."""
        return asdict(self)


def _rss_reader() -> Callable[[], int] | None:
    """A cheap function returning the current RSS in bytes, or None where none is available."""
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def statm() -> int:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * page

        return statm
    try:
        import psutil
    except ImportError:
        return None
    proc = psutil.Process()
    return lambda: int(proc.memory_info().rss)


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def current_rss() -> int | None:
    """The process's resident set size now, in bytes (None where it cannot be read)."""
    read = _rss_reader()
    return read() if read else None


class _Sampler(threading.Thread):
    def __init__(self, read: Callable[[], int], interval: float) -> None:
        super().__init__(daemon=True, name="lmedit-rss-sampler")
        self.read, self.interval = read, interval
        self.peak, self.count = read(), 1
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, self.read())
            self.count += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.read())
        self.count += 1


def _cuda():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda
    return None


@contextlib.contextmanager
def measure(interval: float = 0.005) -> Iterator[Measurement]:
    """Measure the block's wall-clock time and memory; yields a :class:`Measurement` filled on exit.

    Args:
        interval: seconds between background RSS samples.
    """
    m = Measurement()
    read = _rss_reader()
    cuda = _cuda()
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
        m.cuda_start_bytes = int(cuda.memory_allocated())
    rss0 = m.rss_start_bytes = read() if read else None
    maxrss0 = _maxrss_bytes()
    sampler = _Sampler(read, interval) if read else None
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        if cuda is not None:
            cuda.synchronize()  # count the queued kernels in the time
        m.seconds = time.perf_counter() - t0
        peak = None
        if sampler:
            sampler.stop()
            peak, m.rss_samples = sampler.peak, sampler.count
            m.rss_delta_bytes = read() - rss0
        maxrss1 = _maxrss_bytes()
        if maxrss1 > maxrss0:  # a new lifetime peak was set inside the block
            peak = max(peak or 0, maxrss1)
        m.peak_rss_bytes = peak
        if cuda is not None:
            m.cuda_peak_bytes = int(cuda.max_memory_allocated())


def combined(ms: list[Measurement]) -> Measurement:
    """One measurement of blocks run one after the other (stacked edits): seconds and RSS deltas summed,
    peaks the largest, starts those of the first block."""
    if len(ms) <= 1:
        return ms[0] if ms else Measurement()

    def most(name: str) -> int | None:
        vals = [getattr(m, name) for m in ms if getattr(m, name) is not None]
        return max(vals) if vals else None

    deltas = [m.rss_delta_bytes for m in ms if m.rss_delta_bytes is not None]
    return Measurement(seconds=sum(m.seconds for m in ms), peak_rss_bytes=most("peak_rss_bytes"),
                       rss_delta_bytes=sum(deltas) if deltas else None, rss_start_bytes=ms[0].rss_start_bytes,
                       cuda_peak_bytes=most("cuda_peak_bytes"), cuda_start_bytes=ms[0].cuda_start_bytes,
                       rss_samples=sum(m.rss_samples for m in ms))


def human_bytes(n: float | None) -> str:
    """A byte count for people: "512 B", "1.5 MB", "n/a"."""
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def efficiency_record(m: Measurement, n: int, apply_s: float | None) -> dict[str, Any]:
    """A case's efficiency record from the measurement of its chunk's ``compute`` (``n`` requests): seconds
    per request and per chunk, apply seconds, and the memory peaks that were measured."""
    eff = {"seconds": m.seconds / n, "chunk_seconds": m.seconds, "chunk_size": n, "apply_seconds": apply_s,
           "peak_rss_bytes": m.peak_rss_bytes, "rss_delta_bytes": m.rss_delta_bytes,
           "cuda_peak_bytes": m.cuda_peak_bytes, "cuda_start_bytes": m.cuda_start_bytes}
    return {k: v for k, v in eff.items() if v is not None}
