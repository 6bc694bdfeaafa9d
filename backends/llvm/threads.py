"""Splitting a kernel's range across TT_THREADS threads (default: the physical cores). ctypes
releases the GIL for the call, so the threads run the native code in parallel."""
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial


def physical_cores() -> int:
    logical = len(os.sched_getaffinity(0))
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read()
        per_core = sum(1 + int(b) - int(a) if "-" in part else 1
                       for part in siblings.strip().split(",") for a, _, b in [part.partition("-")])
    except OSError:
        per_core = 1
    return max(1, logical // max(per_core, 1))


# Handing work to a pool thread costs tens of microseconds; below this much work (roughly bytes
# or elements touched) one thread finishes first.
MIN_PARALLEL_WORK = 1 << 15


@lru_cache(maxsize=1)
def count() -> int:
    return int(os.environ.get("TT_THREADS") or physical_cores())


@lru_cache(maxsize=1)
def _pool():
    return ThreadPoolExecutor(max_workers=count() - 1) if count() > 1 else None


def split(fn, total: int, grain: int, work: int, *args) -> list[partial]:
    """Calls of fn(start, end, *args) covering [0, total) in chunks that are multiples of
    `grain`: one per thread when `work` (roughly, elements touched) makes the hand-off pay."""
    n = min(count(), total // max(grain, 1)) if work >= MIN_PARALLEL_WORK else 1
    if n <= 1:
        return [partial(fn, 0, total, *args)]
    step = -(-total // n // grain) * grain
    return [partial(fn, s, min(s + step, total), *args) for s in range(0, total, step)]


def spread(calls: list) -> list[partial]:
    """Many small independent calls (one per batch item) dealt out to the threads: one hand-off
    per thread instead of one per call."""
    n = min(count(), len(calls))
    return [partial(_run_each, calls[i::n]) for i in range(n)]


def _run_each(calls):
    for c in calls:
        c()


def run(calls: list) -> None:
    """Run one kernel's calls: the first on this thread, the others on the pool, then wait."""
    if len(calls) == 1:
        calls[0]()
        return
    futures = [_pool().submit(c) for c in calls[1:]]
    calls[0]()
    for f in futures:
        f.result()
