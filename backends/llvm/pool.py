"""The thread pool, in native code: a run of kernels goes from one kernel to the next through a
barrier, as ggml's threads do, and a thread that waits spins a while, then sleeps in the kernel
(a futex), as OpenMP runtimes do.

Why native: waking a thread that sleeps on a lock costs 80-110 us on this VM (the idle vCPU is
halted), more than a whole 576 x 576 matvec, and a decode step of a 30-layer model runs ~500
kernels: a barrier met by spinning costs a cache line going back and forth (~0.2 us). Why sleep
at all: on a machine busy with other work, the thread a spinner waits for may have no core, and
spinning (or yielding) through the scheduler's time slices made SmolLM2 decode 10x slower than
sleeping until woken did. So a barrier spins for ~50 us (longer than the imbalance of a split
kernel), and an idle worker for ~1-2 ms (long enough to meet the next decode step), before
sleeping on the word it waits for.

A run is one stream of 64-bit words per thread, read by `tt_run`:
    [function address, n, arg 1, ..., arg n]   a call of void f(i64 x n)  (our kernels take
                                               only i64 and pointers, which pass alike)
    [BARRIER]                                  wait until every thread has come here
    [END]                                      the same, then return
Every thread's stream has the same barriers. END waits for all so that the caller returns only
once no worker reads the run's streams any more (an eager run's are freed right after). A worker's slot (one cache line) holds the ticket
the caller bumps to post a run, the run's stream and the ticket it last ran.

Sleeping is agreed as in Dekker's algorithm, all sequentially consistent: a sleeper counts itself
in the word's sleepers, then looks at the word once more before the futex wait (which itself
returns at once if the word moved); whoever moves the word then reads the sleepers, and wakes
them if there are any. Futexes take 32 bits: the low half of our 64-bit words (little-endian).
"""
import ctypes
import threading
from functools import lru_cache

import numpy as np

from backends.llvm.compiler import compile_function
from backends.llvm.target import host

BARRIER, END = 0, 1
MOST_ARGS = 32
SLOT_WORDS = 8  # one 64-byte cache line per worker: TICKET, STREAM, SEEN, SLEEPERS
TICKET, STREAM, SEEN, SLEEPERS = range(4)
# the barrier: the count, the generation and its sleepers a cache line apart, then libc's syscall
COUNT, GENERATION, GENERATION_SLEEPERS, SYSCALL, BARRIER_WORDS = 0, 8, 16, 24, 32
BARRIER_SPINS = 1 << 10  # ~50 us of `pause` before a thread at a barrier sleeps
IDLE_SPINS = 1 << 15  # ~1-2 ms before an idle worker sleeps
FUTEX = {"x86_64": 202, "aarch64": 98}  # the futex system call's number
FUTEX_WAIT, FUTEX_WAKE = 128, 129  # FUTEX_WAIT / FUTEX_WAKE | FUTEX_PRIVATE_FLAG


def _pause() -> tuple[str, str]:
    """The spin-wait hint of the host: (declaration, call)."""
    arch = host().arch
    if arch == "x86_64":
        return "declare void @llvm.x86.sse2.pause()", "call void @llvm.x86.sse2.pause()"
    if arch == "aarch64":
        return "declare void @llvm.aarch64.hint(i32)", "call void @llvm.aarch64.hint(i32 1)"
    return "", ""


def _calls() -> str:
    """tt_run's switch on the argument count: one call of f with n i64 arguments per case."""
    cases, blocks = [], []
    for n in range(MOST_ARGS + 1):
        loads = [f"  %a{n}.{i}.p = getelementptr i64, ptr %args, i64 {i}\n  %a{n}.{i} = load i64, ptr %a{n}.{i}.p"
                 for i in range(n)]
        args = ", ".join(f"i64 %a{n}.{i}" for i in range(n))
        cases.append(f"i64 {n}, label %call{n}")
        blocks.append(f"call{n}:\n" + "".join(line + "\n" for line in loads) +
                      f"  call void %f({args})\n  br label %called")
    return "  switch i64 %n, label %called [" + " ".join(cases) + "]\n" + "\n".join(blocks)


@lru_cache(maxsize=1)
def _ir() -> str:
    declare_pause, pause = _pause()
    futex = FUTEX[host().arch]
    return f"""
{declare_pause}

; spin until the word at %p is no longer %seen, then sleep on it (sleepers counted at %sleepers)
define internal void @wait_until_moved(ptr %p, i64 %seen, ptr %sleepers, i64 %spins, ptr %syscall) {{
entry:
  br label %spin
spin:
  %i = phi i64 [0, %entry], [%i.next, %still]
  %now = load atomic i64, ptr %p acquire, align 8
  %moved = icmp ne i64 %now, %seen
  br i1 %moved, label %done, label %still
still:
  {pause}
  %i.next = add i64 %i, 1
  %tired = icmp uge i64 %i.next, %spins
  br i1 %tired, label %sleep, label %spin
sleep:
  %ignored.add = atomicrmw add ptr %sleepers, i64 1 seq_cst
  %late = load atomic i64, ptr %p seq_cst, align 8
  %same = icmp eq i64 %late, %seen
  br i1 %same, label %wait, label %awake
wait:  ; returns at once if the word's low half is no longer %seen's
  %ignored.wait = call i64 (i64, ...) %syscall(i64 {futex}, ptr %p, i64 {FUTEX_WAIT}, i64 %seen, ptr null)
  br label %awake
awake:
  %ignored.sub = atomicrmw sub ptr %sleepers, i64 1 seq_cst
  %again = load atomic i64, ptr %p acquire, align 8
  %still.same = icmp eq i64 %again, %seen
  br i1 %still.same, label %sleep, label %done
done:
  ret void
}}

; move the word at %p to %value and wake whoever sleeps on it
define internal void @announce(ptr %p, i64 %value, ptr %sleepers, ptr %syscall) {{
entry:
  store atomic i64 %value, ptr %p seq_cst, align 8
  %n = load atomic i64, ptr %sleepers seq_cst, align 8
  %any = icmp ne i64 %n, 0
  br i1 %any, label %wake, label %done
wake:
  %ignored = call i64 (i64, ...) %syscall(i64 {futex}, ptr %p, i64 {FUTEX_WAKE}, i64 2147483647)
  br label %done
done:
  ret void
}}

; wait until all n threads have arrived: the last one resets the count and opens the next generation
define internal void @barrier(ptr %b, i64 %n) {{
entry:
  %generation.p = getelementptr i64, ptr %b, i64 {GENERATION}
  %sleepers.p = getelementptr i64, ptr %b, i64 {GENERATION_SLEEPERS}
  %syscall.p = getelementptr i64, ptr %b, i64 {SYSCALL}
  %syscall.word = load i64, ptr %syscall.p
  %syscall = inttoptr i64 %syscall.word to ptr
  %generation = load atomic i64, ptr %generation.p acquire, align 8
  %before = atomicrmw add ptr %b, i64 1 acq_rel
  %n1 = sub i64 %n, 1
  %is.last = icmp eq i64 %before, %n1
  br i1 %is.last, label %open, label %wait
open:
  store atomic i64 0, ptr %b monotonic, align 8
  %next = add i64 %generation, 1
  call void @announce(ptr %generation.p, i64 %next, ptr %sleepers.p, ptr %syscall)
  ret void
wait:
  call void @wait_until_moved(ptr %generation.p, i64 %generation, ptr %sleepers.p, i64 {BARRIER_SPINS}, ptr %syscall)
  ret void
}}

define void @tt_run(ptr %stream, ptr %b, i64 %threads) {{
entry:
  br label %next
next:
  %p = phi ptr [%stream, %entry], [%after.call, %called], [%after.barrier, %barrier]
  %word = load i64, ptr %p
  switch i64 %word, label %call [i64 {BARRIER}, label %barrier i64 {END}, label %end]
barrier:
  call void @barrier(ptr %b, i64 %threads)
  %after.barrier = getelementptr i64, ptr %p, i64 1
  br label %next
call:
  %f = inttoptr i64 %word to ptr
  %n.p = getelementptr i64, ptr %p, i64 1
  %n = load i64, ptr %n.p
  %args = getelementptr i64, ptr %p, i64 2
{_calls()}
called:
  %after.call = getelementptr i64, ptr %args, i64 %n
  br label %next
end:
  %together = icmp ugt i64 %threads, 1
  br i1 %together, label %last.barrier, label %done
last.barrier:
  call void @barrier(ptr %b, i64 %threads)
  br label %done
done:
  ret void
}}

; a worker, for the life of the process: run each run posted to its slot
define void @tt_worker(ptr %slot, ptr %b, i64 %threads) {{
entry:
  %ticket.p = getelementptr i64, ptr %slot, i64 {TICKET}
  %stream.p = getelementptr i64, ptr %slot, i64 {STREAM}
  %seen.p = getelementptr i64, ptr %slot, i64 {SEEN}
  %sleepers.p = getelementptr i64, ptr %slot, i64 {SLEEPERS}
  %syscall.p = getelementptr i64, ptr %b, i64 {SYSCALL}
  %syscall.word = load i64, ptr %syscall.p
  %syscall = inttoptr i64 %syscall.word to ptr
  br label %idle
idle:
  %seen = load i64, ptr %seen.p
  call void @wait_until_moved(ptr %ticket.p, i64 %seen, ptr %sleepers.p, i64 {IDLE_SPINS}, ptr %syscall)
  %ticket = load atomic i64, ptr %ticket.p acquire, align 8
  store i64 %ticket, ptr %seen.p
  %stream.word = load i64, ptr %stream.p
  %stream = inttoptr i64 %stream.word to ptr
  call void @tt_run(ptr %stream, ptr %b, i64 %threads)
  br label %idle
}}

; post a run to each worker, waking those asleep
define void @tt_post(ptr %slots, i64 %workers, ptr %streams, ptr %b) {{
entry:
  %syscall.p = getelementptr i64, ptr %b, i64 {SYSCALL}
  %syscall.word = load i64, ptr %syscall.p
  %syscall = inttoptr i64 %syscall.word to ptr
  br label %each
each:
  %w = phi i64 [0, %entry], [%w.next, %each]
  %offset = mul i64 %w, {SLOT_WORDS}
  %slot = getelementptr i64, ptr %slots, i64 %offset
  %stream.p = getelementptr i64, ptr %slot, i64 {STREAM}
  %stream.src = getelementptr i64, ptr %streams, i64 %w
  %stream = load i64, ptr %stream.src
  store i64 %stream, ptr %stream.p
  %ticket.p = getelementptr i64, ptr %slot, i64 {TICKET}
  %sleepers.p = getelementptr i64, ptr %slot, i64 {SLEEPERS}
  %ticket = load i64, ptr %ticket.p
  %ticket.next = add i64 %ticket, 1
  call void @announce(ptr %ticket.p, i64 %ticket.next, ptr %sleepers.p, ptr %syscall)
  %w.next = add i64 %w, 1
  %more = icmp ult i64 %w.next, %workers
  br i1 %more, label %each, label %done
done:
  ret void
}}
"""


@lru_cache(maxsize=1)
def _native():
    ir, P, I = _ir(), ctypes.c_void_p, ctypes.c_int64
    return (compile_function(ir, "tt_run", [P, P, I]), compile_function(ir, "tt_worker", [P, P, I]),
            compile_function(ir, "tt_post", [P, I, P, P]))


def address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


class Pool:
    """`threads - 1` workers beside the calling thread. `run(streams)` runs one stream per thread
    (streams[0] on the caller) and returns when all have reached their END."""

    def __init__(self, threads: int):
        self.threads = threads
        self.run_native, worker, self.post = _native()
        self.slots = np.zeros(max(threads - 1, 1) * SLOT_WORDS, np.int64)
        self.barrier = np.zeros(BARRIER_WORDS, np.int64)
        self.barrier[SYSCALL] = address(ctypes.CDLL(None).syscall)
        for w in range(threads - 1):  # each enters its native loop once and never returns
            slot = self.slots.ctypes.data + w * SLOT_WORDS * 8
            threading.Thread(target=worker, args=(slot, self.barrier.ctypes.data, threads), daemon=True).start()
        self._one_at_a_time = threading.Lock()  # one run in flight: the slots and barrier are shared

    def run(self, streams: "Streams") -> None:
        assert streams.threads in (1, self.threads), "a run is for the caller alone or for every thread"
        with self._one_at_a_time:
            if streams.threads > 1:
                self.post(self.slots.ctypes.data, self.threads - 1, streams.workers.ctypes.data,
                          self.barrier.ctypes.data)
            self.run_native(streams.caller, self.barrier.ctypes.data, streams.threads)


class Streams:
    """A run's streams, one per thread, as the pool reads them: the caller's address and the
    workers' addresses in an array (kept alive with the streams)."""

    def __init__(self, streams: list[np.ndarray]):
        self.streams, self.threads = streams, len(streams)
        self.caller = streams[0].ctypes.data
        self.workers = np.array([s.ctypes.data for s in streams[1:]] or [0], np.int64)
