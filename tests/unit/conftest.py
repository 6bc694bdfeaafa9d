import pytest

from tests.levels import backend_params, use_backend


@pytest.fixture(params=backend_params(levels=True))
def backend(request):
    """The kernel tests run on each backend, and on llvm at every level this CPU runs."""
    yield from use_backend(request.param)
