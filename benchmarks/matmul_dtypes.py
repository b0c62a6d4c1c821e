"""How fast this CPU runs the matrix products of a value step, in float32 and in bfloat16.

A value step (``lmedit.locate.values``) multiplies a few rows (7 rows of 3 suffix tokens for a SmolLM2 ROME edit:
21; 13 loss positions for the unembedding) by every weight above the edit layer, forward (x Wᵀ) and backward
(g W). This times those shapes with one thread, float32 against bfloat16 (weights converted once, as
``v_matmuls=bf16`` does), and reports GFLOP/s, so it shows whether a step is bound by arithmetic or by
reading the weights.

    python benchmarks/matmul_dtypes.py      # writes results/matmul_dtypes.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import write_report

RESULT = Path(__file__).parent / "results" / "matmul_dtypes.md"
SHAPES = [  # (name, rows, out, in) of SmolLM2-135M's products in a ROME value step
    ("gate/up projection", 21, 1536, 576),
    ("down projection", 21, 576, 1536),
    ("q/o projection", 21, 576, 576),
    ("k/v projection", 21, 192, 576),
    ("unembedding, loss positions", 13, 49152, 576),
]


def best_ms(f, repeats: int) -> float:
    for _ in range(3):
        f()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            f()
        best = min(best, (time.perf_counter() - t) / repeats)
    return best * 1e3


def cpu() -> tuple[str, bool]:
    """(the CPU's model name, whether it has AVX-512 BF16), from /proc/cpuinfo where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), False
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    return (names[0] if names else platform.machine()), "avx512_bf16" in info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for name, m, o, i in SHAPES:
        w, x, g = torch.randn(o, i), torch.randn(m, i), torch.randn(m, o)
        wb, xb, gb = w.bfloat16(), x.bfloat16(), g.bfloat16()
        n = 10 if o > 10_000 else 100
        times = [best_ms(lambda a=x, b=w: F.linear(a, b), n), best_ms(lambda a=g, b=w: a @ b, n),
                 best_ms(lambda a=xb, b=wb: F.linear(a, b), n), best_ms(lambda a=gb, b=wb: a @ b, n)]
        gflop = 2 * m * o * i / 1e9
        rows.append((name, m, o, i, times, gflop))
        print(name, [f"{t:.3f}" for t in times], flush=True)
    name, bf16 = cpu()
    lines = ["# Matrix products of a value step: float32 against bfloat16 (one thread)", "",
             f"`{' '.join(['python benchmarks/matmul_dtypes.py', *sys.argv[1:]])}`", "",
             f"{name}; AVX-512 BF16: {'yes' if bf16 else 'no'}; torch {torch.__version__}; "
             "best of 3 timings of repeated products, milliseconds per product.", "",
             "| product | rows × out × in | float32 x Wᵀ | float32 g W | bf16 x Wᵀ | bf16 g W | float32 GFLOP/s "
             "| bf16 speed-up (x Wᵀ / g W) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, m, o, i, (f, fb, b, bb), gflop in rows:
        lines.append(f"| {name} | {m} × {o} × {i} | {f:.3f} | {fb:.3f} | {b:.3f} | {bb:.3f} | {gflop / f * 1e3:.0f} "
                     f"| {f / b:.2f}× / {fb / bb:.2f}× |")
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
