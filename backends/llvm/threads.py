"""Splitting a kernel's range across TT_THREADS threads (default: the physical cores), and
running kernels on them: the threads are the native pool's (pool.py), which goes from one kernel
to the next through a barrier without returning to Python."""
import ctypes
import os
from functools import lru_cache, partial

import numpy as np

from backends.llvm import pool


def physical_cores() -> int:
    logical = len(os.sched_getaffinity(0))
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read()
        per_core = sum(1 + int(b) - int(a) if "-" in part else 1
                       for part in siblings.strip().split(",") for a, _, b in [part.partition("-")])
    except OSError:
        per_core = 1
    return max(1, logical // max(per_core, 1))


# A kernel split over the threads ends at a barrier, waiting for the slowest share (and for workers
# to wake if they slept); below this much work (roughly bytes or elements touched) one thread
# finishes first.
MIN_PARALLEL_WORK = 1 << 15


MAX_THREADS = 512  # as ggml's GGML_MAX_N_THREADS; each thread has a native stack and a share of every kernel


# processes mpirun started on this machine (MPICH, Open MPI), which share its cores
LOCAL_PROCESSES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def local_processes() -> int:
    return next((int(os.environ[n]) for n in LOCAL_PROCESSES if os.environ.get(n, "").isdigit()), 1)


@lru_cache(maxsize=1)
def count() -> int:
    """TT_THREADS, else the physical cores (shared out among the processes mpirun started on
    this machine: more threads than cores would make every step wait for the slowest)."""
    setting = os.environ.get("TT_THREADS", "").strip()
    if not setting:
        return max(1, physical_cores() // max(local_processes(), 1))
    if not setting.isdigit() or not 1 <= int(setting) <= MAX_THREADS:
        raise ValueError(f"TT_THREADS={setting!r}: give a whole number of threads from 1 to {MAX_THREADS} (or unset "
                         f"it for one per core, {physical_cores()} here)")
    return int(setting)


def split(fn, total: int, grain: int, work: int, *args) -> list[partial]:
    """Calls of fn(start, end, *args) covering [0, total) in chunks that are multiples of
    `grain`: one per thread when `work` (roughly, elements touched) makes the hand-off pay."""
    n = min(count(), total // max(grain, 1)) if work >= MIN_PARALLEL_WORK else 1
    if n <= 1:
        return [partial(fn, 0, total, *args)]
    step = -(-total // n // grain) * grain
    return [partial(fn, s, min(s + step, total), *args) for s in range(0, total, step)]


def spread(calls: list, work: int = MIN_PARALLEL_WORK) -> list[partial]:
    """Many small independent calls (one per batch item) dealt out to the threads: one hand-off
    per thread instead of one per call, and none when `work` is too little to pay for it."""
    n = min(count(), len(calls)) if work >= MIN_PARALLEL_WORK else 1
    return [partial(_run_each, calls[i::n]) for i in range(n)]


def together(groups: list[list]) -> list[partial]:
    """The calls of several independent kernels run with one hand-off: each thread runs its
    share of every kernel in turn."""
    n = max((len(g) for g in groups), default=0)
    return [partial(_run_each, [g[t] for g in groups if t < len(g)]) for t in range(n)]


def _run_each(calls):
    for c in calls:
        c()


class Run:
    """Kernels run one after another, each by its calls (call t on thread t), encoded once into
    the native pool's streams (see pool.py): a barrier between two kernels unless both run on
    the calling thread alone, so that a kernel reads what the one before it wrote, and one at the
    end. Calls that are not compiled kernels (Python functions) make the run go call by call on
    this thread."""

    def __init__(self, kernels: list[list]):
        self.kernels = kernels
        words = [[_words(call) for call in calls] for calls in kernels]
        if any(None in calls for calls in words):
            self.streams = None
            return
        threads = count() if any(len(calls) > 1 for calls in kernels) else 1  # all or none of the workers
        streams = [[] for _ in range(threads)]
        for i, calls in enumerate(words):
            for t, call in enumerate(calls):
                streams[t] += call
            last = i + 1 == len(words)  # END is the last barrier
            if threads > 1 and not last and not (len(calls) == 1 and len(words[i + 1]) == 1):
                for stream in streams:
                    stream.append(pool.BARRIER)
        self.streams = pool.Streams([np.array(stream + [pool.END], np.int64) for stream in streams])

    def __call__(self) -> None:
        if self.streams is None:
            for calls in self.kernels:
                for call in calls:
                    call()
            return
        _pool(self.streams.threads).run(self.streams)


def native(calls: list) -> bool:
    """Whether every call is a compiled kernel's, so that the pool's threads can run them."""
    return all(_words(call) is not None for call in calls)


def _words(call) -> list[int] | None:
    """A call's stream words, or None when it is not a compiled kernel's."""
    if not isinstance(call, partial):
        return None
    if call.func is _run_each:
        words = [_words(c) for c in call.args[0]]
        return None if None in words else [w for c in words for w in c]
    if not isinstance(call.func, ctypes._CFuncPtr) or len(call.args) > pool.MOST_ARGS or call.keywords:
        return None
    return [pool.address(call.func), len(call.args), *map(int, call.args)]


@lru_cache(maxsize=None)
def _pool(threads: int) -> pool.Pool:
    return pool.Pool(threads)


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the workers


def run(calls: list) -> None:
    """Run one kernel's calls (at most one per thread), the first on this thread."""
    Run([calls])()
