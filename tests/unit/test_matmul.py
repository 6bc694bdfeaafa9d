"""Matrix products: 1-D and batched operands, broadcasting batch axes, every float dtype."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from tests.reference import FLOATS, INTS, assert_close, summation_error, tensors, values
from tinytensor import Tensor


@st.composite
def matmul_pair(draw, dtype_choices=FLOATS):
    dtype = draw(st.sampled_from(dtype_choices))
    m, k, n = (draw(st.integers(1, 6)) for _ in range(3))
    batch_a, batch_b = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3)).input_shapes
    a_shape = (k,) if draw(st.integers(0, 4)) == 0 else batch_a + (m, k)
    b_shape = (k,) if draw(st.integers(0, 4)) == 0 else batch_b + (k, n)
    return draw(tensors([dtype], a_shape, -4, 4)), draw(tensors([dtype], b_shape, -4, 4))


@given(pair=matmul_pair())
def test_matmul_matches_numpy(backend, pair):
    a, b = pair
    va, vb = values(a), values(b)
    # each output sums k products: float32 summation error on sum |a||b|
    bound = summation_error(a.shape[-1], np.abs(va).max(initial=0) * np.abs(vb).max(initial=0) * a.shape[-1])
    assert_close(a @ b, np.matmul(va, vb), atol=bound)


@given(pair=matmul_pair(INTS))
def test_int_matmul_is_exact(backend, pair):
    a, b = pair
    np.testing.assert_array_equal((a @ b).numpy(), np.matmul(a.numpy(), b.numpy()))


def test_matmul_shape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4, 5\)"):
        Tensor.zeros(2, 3) @ Tensor.zeros(4, 5)


def test_matmul_batch_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 2, 3\) and \(3, 3, 5\)"):
        Tensor.zeros(2, 2, 3) @ Tensor.zeros(3, 3, 5)


def test_matmul_of_lists(backend):
    np.testing.assert_array_equal((Tensor([[1.0, 2.0]]) @ Tensor([[3.0], [4.0]])).numpy(), [[11.0]])
