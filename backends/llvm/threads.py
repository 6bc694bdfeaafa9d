"""Splitting a kernel's range across TT_THREADS threads (default: the physical cores). ctypes
releases the GIL for the call, so the threads run the native code in parallel."""
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache


def physical_cores() -> int:
    logical = len(os.sched_getaffinity(0))
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read()
        per_core = sum(1 + int(b) - int(a) if "-" in part else 1
                       for part in siblings.strip().split(",") for a, _, b in [part.partition("-")])
    except OSError:
        per_core = 1
    return max(1, logical // max(per_core, 1))


@lru_cache(maxsize=1)
def count() -> int:
    return int(os.environ.get("TT_THREADS") or physical_cores())


@lru_cache(maxsize=1)
def _pool():
    return ThreadPoolExecutor(max_workers=count() - 1) if count() > 1 else None


def parallel(fn, total: int, grain: int, work: int, *args):
    """Call fn(start, end, *args) over [0, total) in chunks that are multiples of `grain`, on all
    threads when `work` (roughly, elements touched) makes it worth the hand-off."""
    n = min(count(), total // max(grain, 1)) if work >= 1 << 15 else 1
    if n <= 1:
        fn(0, total, *args)
        return
    step = -(-total // n // grain) * grain
    bounds = [(s, min(s + step, total)) for s in range(0, total, step)]
    futures = [_pool().submit(fn, s, e, *args) for s, e in bounds[1:]]
    fn(*bounds[0], *args)
    for f in futures:
        f.result()
