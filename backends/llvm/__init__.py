"""The LLVM backend: each scheduled kernel becomes native SIMD code for the host CPU, compiled
once per kernel structure and run on all threads. Movement ops stay NumPy views (no copies),
and ops without a native kernel yet (gather, cat, pad, argmax, random numbers...) run their
NumPy reference, so every graph runs.

Each kernel is first turned into *calls*: compiled functions bound to their pointers and
ranges, one per thread. Eager execution builds and runs them node by node; `prepare` builds them
once for a captured schedule (see tinytensor.jit) over buffers fixed for its lifetime, so a
replay is a flat list of native calls.
"""
from backends.llvm.backend import BACKEND  # noqa: F401  (the registry's entry)
