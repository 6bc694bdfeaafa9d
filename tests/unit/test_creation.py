"""Making tensors: constructors, dtypes, and reading values back."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ops import dtypes
from tests.reference import FLOATS, INTS, shapes
from tinytensor import Tensor


def test_python_values_take_pytorch_default_dtypes():
    assert Tensor([1.0, 2.0]).dtype == dtypes.float32
    assert Tensor([1, 2]).dtype == dtypes.int64
    assert Tensor([True]).dtype == dtypes.bool_
    assert Tensor(np.zeros(2, np.float64)).dtype == dtypes.float32
    assert Tensor(3.5).shape == () and Tensor(3.5).item() == 3.5


@pytest.mark.parametrize("dtype", FLOATS + INTS + [dtypes.bool_], ids=lambda d: d.name)
@given(shape=shapes(max_dims=3))
def test_full_zeros_ones(backend, dtype, shape):
    np.testing.assert_array_equal(Tensor.zeros(shape, dtype=dtype).numpy(), np.zeros(shape))
    np.testing.assert_array_equal(Tensor.ones(*shape, dtype=dtype).numpy(), np.ones(shape))
    assert Tensor.full(shape, 1, dtype).dtype == dtype
    assert Tensor.empty(shape, dtype=dtype).numpy().shape == shape


def test_full_infers_dtype_from_the_value(backend):
    assert Tensor.full((2,), 3).dtype == dtypes.int64
    assert Tensor.full((2,), 3.0).dtype == dtypes.float32
    assert Tensor.full((2,), True).dtype == dtypes.bool_


@given(start=st.integers(-20, 20), length=st.integers(0, 20), step=st.integers(-3, 3).filter(bool))
def test_arange_like_numpy(backend, start, length, step):
    stop = start + length * step
    np.testing.assert_array_equal(Tensor.arange(start, stop, step).numpy(), np.arange(start, stop, step))
    np.testing.assert_allclose(Tensor.arange(start / 2, stop / 2, step / 2).numpy(),
                               np.arange(start / 2, stop / 2, step / 2, dtype=np.float64), rtol=1e-6)


def test_arange_one_argument(backend):
    assert Tensor.arange(4).tolist() == [0, 1, 2, 3]


def test_randn_is_reproducible_with_a_seed(backend):
    a, b = Tensor.randn(3, 4, seed=7).numpy(), Tensor.randn((3, 4), seed=7).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, Tensor.randn(3, 4, seed=8).numpy())
    assert not np.array_equal(Tensor.randn(8).numpy(), Tensor.randn(8).numpy())  # no seed: fresh


def test_randn_is_standard_normal(backend):
    x = Tensor.randn(100_000, seed=0).numpy()
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01  # 0.01 is > 3 standard errors here


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: d.name)
def test_values_round_trip(dtype):
    x = Tensor([[0.5, -1.25], [2.0, 1024.0]], dtype=dtype)
    assert x.tolist() == [[0.5, -1.25], [2.0, 1024.0]]
    assert x.shape == (2, 2) and x.ndim == 2 and x.numel == 4 and len(x) == 2


def test_from_numpy_shares_memory_and_reads_bfloat16_bits():
    bits = np.array([0x3FC0, 0xC000], dtype=np.uint16)  # 1.5, -2.0
    x = Tensor.from_numpy(bits, dtype="bfloat16")
    assert x.node.buffer is bits and x.tolist() == [1.5, -2.0]


def test_constructor_copies_the_array():
    data = np.array([1.0, 2.0], np.float32)
    x = Tensor(data)
    x[0] = 5.0
    x.realize()
    assert data.tolist() == [1.0, 2.0]


def test_item_needs_one_element():
    with pytest.raises(ValueError, match=r"\(2,\)"):
        Tensor([1.0, 2.0]).item()


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="unknown dtype 'float8'"):
        Tensor([1.0], dtype="float8")


def test_ragged_data_is_a_clear_error():
    with pytest.raises((TypeError, ValueError)):
        Tensor([[1.0], [1.0, 2.0]])
