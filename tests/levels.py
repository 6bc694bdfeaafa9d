"""What the `backend` fixtures run a test on: each backend, and llvm at each instruction-set
level this CPU runs (conftest.py, tests/unit/conftest.py and test_smollm2.py use these)."""
import contextlib
import os

import pytest

import backends


def backend_params(levels: bool = False):
    """Each backend; with `levels`, llvm again at each instruction-set level this CPU runs
    (TT_TARGET's: an AVX-512 VNNI host runs the AVX2, AVX-512 and VNNI kernels too; an aarch64
    one with dotprod, NEON's and sdot's), those in the slow tier."""
    from backends.llvm.target import levels_here
    chosen = os.environ.get("TT_TEST_LEVELS")  # a comma-separated subset, or "none"
    return sorted(backends.KNOWN) + [pytest.param(("llvm", level), id=f"llvm-{level}", marks=pytest.mark.slow)
                                     for level in (levels_here() if levels else ())
                                     if chosen is None or level in chosen.split(",")]


def use_backend(param):
    """The `backend` fixtures' body: that backend (at that level) while the tests run."""
    name, level = param if isinstance(param, tuple) else (param, None)
    with target_level(level):
        backends.use(name)
        yield name
        backends.use(None)


@contextlib.contextmanager
def target_level(level):
    """Compile for TT_TARGET=level meanwhile (None: as the environment says)."""
    from backends.llvm.target import host
    if level is None:
        yield
        return
    before = os.environ.get("TT_TARGET")
    os.environ["TT_TARGET"] = level
    host.cache_clear()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TT_TARGET"]
        else:
            os.environ["TT_TARGET"] = before
        host.cache_clear()
