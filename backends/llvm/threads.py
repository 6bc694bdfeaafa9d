"""Splitting a kernel's range across TT_THREADS threads (default: the physical cores). ctypes
releases the GIL for the call, so the threads run the native code in parallel."""
import os
import threading
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
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(f"TT_THREADS={setting!r}: give a whole number of threads >= 1 (or unset it for "
                         f"one per core, {physical_cores()} here)")
    return int(setting)


class _Worker:
    """A thread that runs one task per hand-off. Two bare locks carry the hand-off (about 13 us
    here, against 39 us for a ThreadPoolExecutor future), which matters for the ~200 kernels of a
    decode step that are split across threads."""

    def __init__(self):
        self.go, self.done = threading.Lock(), threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.task, self.error = None, None
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            self.go.acquire()
            try:
                self.task()
            except BaseException as e:  # handed back to the caller in wait()
                self.error = e
            self.done.release()

    def start(self, task):
        self.task = task
        self.go.release()

    def wait(self):
        self.done.acquire()
        error, self.error = self.error, None
        if error is not None:
            raise error


@lru_cache(maxsize=1)
def _workers() -> list[_Worker]:
    return [_Worker() for _ in range(count() - 1)]


_one_at_a_time = threading.Lock()


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


def run(calls: list) -> None:
    """Run one kernel's calls (at most one per thread): the first on this thread, the others on
    the workers, then wait for all."""
    if len(calls) == 1:
        calls[0]()
        return
    with _one_at_a_time:
        helpers = _workers()[:len(calls) - 1]
        for worker, call in zip(helpers, calls[1:]):
            worker.start(call)
        try:
            calls[0]()
        finally:
            for worker in helpers:
                worker.wait()
