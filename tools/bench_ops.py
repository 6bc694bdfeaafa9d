"""Kernel benchmark at Llama 3.2 1B shapes: the llvm backend beside NumPy/OpenBLAS (same
threads) and beside this machine's measured read bandwidth, in one run. Medians of repeated runs;
ratios to peers measured in the same run, since these machines are shared and noisy.

    python -m tools.bench_ops [--repeat 15] [--quick]

Each case is captured with tinytensor.jit and replayed, so it times the kernels, not recording.
"""
import argparse
import os
import statistics
import time

import numpy as np

import backends
from ops import dtypes
from tinytensor import Tensor, nn
from tinytensor.jit import jit


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm up: compile, fault pages in
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(repeat: int) -> float:
    """GB/s of the fastest streaming read we can make over 512 MiB (far past the caches): NumPy's
    sum, the llvm row-sum, or OpenBLAS's matrix-vector product (which streams its matrix on all
    threads), whichever is fastest: a lower bound on the machine's read bandwidth."""
    array = np.ones((8192, 16384), np.float32)
    vector = np.ones(16384, np.float32)
    data = Tensor.from_numpy(array)
    rows = jit(lambda x: x.sum(-1))
    seconds = min(median_seconds(lambda: rows(data), repeat), median_seconds(array.sum, repeat),
                  median_seconds(lambda: array @ vector, repeat))
    return array.nbytes / seconds / 1e9


def matvec(n: int, k: int, dtype, repeat: int) -> tuple[float, float]:
    """(llvm GB/s, NumPy GB/s) for x[1, k] @ W[n, k].T, the decode case: weight bytes per second."""
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((n, k), dtype=np.float32)
    x32 = rng.standard_normal((1, k), dtype=np.float32)
    w = Tensor(w32, dtype=dtype).realize()
    step = jit(lambda x: nn.linear(x, w))
    x = Tensor(x32)
    ours = median_seconds(lambda: step(x), repeat)
    theirs = median_seconds(lambda: x32 @ w32.T, repeat)
    return n * k * dtype.itemsize / ours / 1e9, n * k * 4 / theirs / 1e9


def matmul(m: int, n: int, k: int, repeat: int) -> tuple[float, float]:
    """(llvm GFLOP/s, NumPy GFLOP/s) for x[m, k] @ W[n, k].T in float32 (prefill)."""
    rng = np.random.default_rng(1)
    w32, x32 = rng.standard_normal((n, k), dtype=np.float32), rng.standard_normal((m, k), dtype=np.float32)
    w = Tensor(w32).realize()
    step = jit(lambda x: nn.linear(x, w))
    x = Tensor(x32)
    flops = 2 * m * n * k
    return flops / median_seconds(lambda: step(x), repeat) / 1e9, \
        flops / median_seconds(lambda: x32 @ w32.T, repeat) / 1e9


def block_matmul(m: int, n: int, k: int, dtype, repeat: int) -> float:
    """llvm GFLOP/s for x[m, k] @ W[n, k].T with W in a block format, kept as stored (prefill)."""
    rng = np.random.default_rng(3)
    raw = dtype.block.quantize(rng.standard_normal((n, k), dtype=np.float32))
    w = Tensor.from_numpy(raw, dtype).realize()
    step = jit(lambda x: nn.linear(x, w))
    x = Tensor(rng.standard_normal((m, k), dtype=np.float32))
    return 2 * m * n * k / median_seconds(lambda: step(x), repeat) / 1e9


def attention(length: int, repeat: int) -> tuple[float, float]:
    """(llvm GB/s, numpy-backend GB/s) of one decode query (32 heads, 8 KV heads, head 64) over
    `length` cached positions: bytes of K and V read per second."""
    rng = np.random.default_rng(2)
    k = Tensor(rng.standard_normal((8, length, 64), dtype=np.float32)).realize()
    v = Tensor(rng.standard_normal((8, length, 64), dtype=np.float32)).realize()
    q = Tensor(rng.standard_normal((32, 1, 64), dtype=np.float32))
    kv_bytes = 2 * 8 * length * 64 * 4
    out = []
    for name in ("llvm", "numpy"):
        backends.use(name)
        step = jit(lambda query: nn.scaled_dot_product_attention(query, k, v))
        out.append(kv_bytes / median_seconds(lambda: step(q), repeat) / 1e9)
    backends.use("llvm")
    return out[0], out[1]


def replay_overhead(kernels: int, repeat: int) -> float:
    """Microseconds per kernel of replaying a captured step: a chain of tiny kernels that cannot
    fuse, so the time is Python and call overhead, not work."""
    x = Tensor(np.ones((1, 8), np.float32))

    def chain(t):
        for _ in range(kernels):
            t = t.sum(-1, keepdim=True).expand(1, 8)  # a reduction ends every kernel
        return t
    step = jit(chain)
    return median_seconds(lambda: step(x), repeat) / kernels * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.bench_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke test")
    args = p.parse_args(argv)
    backends.use("llvm")
    from backends.llvm import threads
    count = threads.count
    r = args.repeat
    bw = read_bandwidth(r)
    print(f"threads: {count()}   measured read bandwidth: {bw:.1f} GB/s   (medians of {r} runs)\n")
    print(f"{'matrix-vector (decode)':<34} {'llvm GB/s':>10} {'% of bw':>8} {'NumPy f32 GB/s':>15}")
    shapes = [(8192, 2048), (2048, 8192), (128256, 2048)] if not args.quick else [(1024, 512)]
    for dtype in (dtypes.float32, dtypes.bfloat16):
        for n, k in shapes:
            ours, theirs = matvec(n, k, dtype, r)
            print(f"  W[{n}, {k}] {dtype.name:<9}{'':<{13 - len(str(n)) - len(str(k))}} {ours:>10.1f} "
                  f"{100 * ours / bw:>7.0f}% {theirs:>15.1f}")
    print(f"\n{'matmul float32 (prefill)':<34} {'llvm GFLOP/s':>12} {'NumPy GFLOP/s':>14} {'ratio':>7}")
    for m in ((128, 512) if not args.quick else (16,)):
        n, k = (8192, 2048) if not args.quick else (256, 128)
        ours, theirs = matmul(m, n, k, r)
        print(f"  x[{m}, {k}] @ W[{n}, {k}].T{'':<{8 - len(str(m))}} {ours:>12.1f} {theirs:>14.1f} {ours / theirs:>7.2f}")
    threads.count.cache_clear()
    os.environ["TT_THREADS"] = "1"
    one, _ = matmul(512 if not args.quick else 16, *((8192, 2048) if not args.quick else (256, 128)), r)
    del os.environ["TT_THREADS"]
    threads.count.cache_clear()
    print(f"  the last matmul on 1 thread: {one:.1f} GFLOP/s ({ours / one:.2f}x speed-up on {threads.count()} threads)")
    print(f"\n{'matmul on blocks (prefill)':<34} {'llvm GFLOP/s':>12}")
    m, n, k = (64, 8192, 2048) if not args.quick else (16, 256, 256)
    for dtype in (dtypes.q4_0, dtypes.q8_0, dtypes.q4_k, dtypes.q6_k):
        print(f"  x[{m}, {k}] @ W[{n}, {k}].T {dtype.name:<6} {block_matmul(m, n, k, dtype, r):>9.1f}")
    print(f"\n{'attention, one query (decode)':<34} {'llvm GB/s':>10} {'numpy-backend GB/s':>19}")
    for length in ((1024, 8192) if not args.quick else (128,)):
        ours, theirs = attention(length, r)
        print(f"  over {length} positions{'':<{16 - len(str(length))}} {ours:>10.1f} {theirs:>19.1f}")
    per_kernel = replay_overhead(200, r)
    print(f"\njit replay overhead: {per_kernel:.1f} us per kernel (a 200-kernel chain)")


if __name__ == "__main__":
    main()
