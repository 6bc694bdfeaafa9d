"""The native thread pool (backends/llvm/pool.py): kernels split over threads see what the kernel
before them wrote, workers that went to sleep wake for the next run, idle workers sleep instead
of spinning, and more threads than cores still finish. Each case runs in a fresh process with TT_THREADS=3 (whatever this machine has),
so the workers and barriers are used even on one core, and a hang fails by timeout."""
import subprocess
import sys
import textwrap

import pytest

SETUP = """
import numpy as np
import backends
backends.use("llvm")
from tinytensor import Tensor
from tinytensor.jit import jit
from backends.llvm import threads
assert threads.count() == 3
N, STEPS = 384, 40
rng = np.random.default_rng(0)
W = np.linalg.qr(rng.standard_normal((N, N)))[0].astype(np.float32)  # orthogonal: |v| stays 1
v0 = rng.standard_normal((1, N)).astype(np.float32)
v0 /= np.linalg.norm(v0)
weight = Tensor(W)

def chain(v):  # STEPS matvecs, each split over the threads, each reading all of the one before
    for _ in range(STEPS):
        v = v @ weight.T  # a decode step's x @ W.T
    return v

expected = v0.astype(np.float64)
for _ in range(STEPS):
    expected = expected @ W.T.astype(np.float64)
# float32 sums of N terms, STEPS times over: at most STEPS * N * 2^-24 of |v| = 1
BOUND = STEPS * N * 2.0 ** -24
step = jit(chain)
"""


def run_case(body: str, timeout: float = 120) -> str:
    script = SETUP + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ, "TT_THREADS": "3"},
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_kernel_on_another_thread_reads_what_the_kernel_before_it_wrote():
    out = run_case("""
        for _ in range(5):
            got = step(Tensor(v0)).numpy()
            assert abs(got - expected).max() <= BOUND, abs(got - expected).max()
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_run_returns_only_once_no_worker_reads_its_streams():
    # an eager node's run is encoded, run once and freed: a worker that read its stream's END
    # after the caller had returned read freed memory (as calls: it crashed a perplexity run).
    # Here each run's streams are overwritten with a bad function address as soon as it returns.
    out = run_case("""
        import ctypes
        from functools import partial
        from backends.llvm.compiler import compile_function
        noop = compile_function("define void @noop(i64 %a, i64 %b) {\\n  ret void\\n}", "noop",
                                [ctypes.c_int64, ctypes.c_int64])
        for i in range(3000):
            run = threads.Run([[partial(noop, t, i) for t in range(3)]] * 2)
            run()
            for stream in run.streams.streams:
                stream[:] = 0xdead
        print("ok")
    """)
    assert out.strip() == "ok"


def test_workers_asleep_wake_for_the_next_run():
    # waits around the ~1-2 ms the workers spin before sleeping, so that posts meet workers
    # spinning, going to sleep and asleep
    out = run_case("""
        import random, time
        first = step(Tensor(v0)).numpy()
        random.seed(0)
        for i in range(150):
            time.sleep(random.choice([0, 0.0005, 0.001, 0.002, 0.004, 0.02]))
            assert np.array_equal(step(Tensor(v0)).numpy(), first), i
        print("ok")
    """)
    assert out.strip() == "ok"


def test_idle_workers_sleep_in_the_kernel_instead_of_spinning():
    # after a run the workers spin ~1-2 ms, then wait on a futex: asleep ('S'), using no CPU time
    out = run_case("""
        import os, threading, time
        step(Tensor(v0))
        workers = [t.native_id for t in threading.enumerate() if t is not threading.main_thread()]
        assert len(workers) == 2, workers

        def stat(tid):  # (state, user + system clock ticks) from /proc
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            return fields[0], int(fields[11]) + int(fields[12])
        time.sleep(0.2)
        before = [stat(t) for t in workers]
        time.sleep(0.5)
        after = [stat(t) for t in workers]
        print([state for state, _ in after], [a[1] - b[1] for a, b in zip(after, before)])
    """)
    assert out.strip() == "['S', 'S'] [0, 0]"


def test_a_forked_child_runs_kernels_on_its_own_workers():
    out = run_case("""
        import os
        first = step(Tensor(v0)).numpy()
        child = os.fork()
        if child == 0:
            os._exit(0 if np.array_equal(step(Tensor(v0)).numpy(), first) else 1)
        _, status = os.waitpid(child, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    assert out.strip() == "0"


def test_python_calls_in_a_kernel_run_on_the_calling_thread_and_raise_there():
    from backends.llvm import threads
    ran = []

    def fail():
        raise RuntimeError("in a Python call")
    with pytest.raises(RuntimeError, match="in a Python call"):
        threads.run([lambda: ran.append(1), fail])
    assert ran == [1]
    threads.run([lambda: ran.append(2)] * 2)  # the pool is still usable
    assert ran == [1, 2, 2]


def test_a_kernel_of_python_calls_leaves_its_neighbours_on_the_threads():
    import ctypes
    from functools import partial
    from backends.llvm.compiler import compile_function
    from backends.llvm.plan import Plan
    noop = compile_function("define void @noop2(i64 %a, i64 %b) {\n  ret void\n}", "noop2",
                            [ctypes.c_int64, ctypes.c_int64])
    ran = []
    plan = Plan(fixed=True)
    for calls in ([partial(noop, 0, 1), partial(noop, 1, 2)], [lambda: ran.append(1)], [partial(noop, 2, 3)],
                  [partial(noop, 3, 4)]):
        plan.kernel(calls)
    plan.run()
    assert ran == [1]
    assert [run.streams is not None for run in plan.runs] == [True, False, True]  # the last two as one run
