"""Reductions over any set of axes, with and without keepdim."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ops import dtypes
from tests.reference import FLOATS, INTS, assert_close, shapes, summation_error, tensors, values
from tinytensor import Tensor


@st.composite
def tensor_and_axes(draw, dtype_choices=FLOATS, min_side=0):
    x = draw(tensors(dtype_choices, draw(shapes(min_side=min_side))))
    axes = draw(st.none() | st.lists(st.integers(-max(x.ndim, 1), max(x.ndim, 1) - 1), unique=True,
                                     max_size=x.ndim).map(tuple) if x.ndim else st.none())
    if axes is not None and len({a % x.ndim for a in axes}) != len(axes):
        axes = None
    return x, axes, draw(st.booleans())


def _count(x, axes):
    return max(1, int(np.prod([x.shape[a] for a in (range(x.ndim) if axes is None else axes)])))


@given(case=tensor_and_axes())
def test_sum_matches_numpy(backend, case):
    x, axes, keepdim = case
    v = values(x)
    assert_close(x.sum(axes, keepdim=keepdim), v.sum(axis=axes, keepdims=keepdim),
                 atol=summation_error(_count(x, axes), np.abs(v).sum()))


@given(case=tensor_and_axes())
def test_mean_matches_numpy(backend, case):
    x, axes, keepdim = case
    if _count(x, axes) == 0 or 0 in x.shape:
        return
    v = values(x)
    # the sum's error, divided by the count; then one more rounding for the division
    assert_close(x.mean(axes, keepdim=keepdim), v.mean(axis=axes, keepdims=keepdim), roundings=2,
                 atol=summation_error(_count(x, axes), np.abs(v).sum()) / _count(x, axes))


@given(case=tensor_and_axes(FLOATS + INTS, min_side=1))
def test_max_min_match_numpy(backend, case):
    x, axes, keepdim = case
    assert_close(x.max(axes, keepdim=keepdim), values(x).max(axis=axes, keepdims=keepdim))
    assert_close(x.min(axes, keepdim=keepdim), values(x).min(axis=axes, keepdims=keepdim))


@given(case=tensor_and_axes(INTS))
def test_int_sum_is_exact_int64(backend, case):
    x, axes, keepdim = case
    out = x.sum(axes, keepdim=keepdim)
    assert out.dtype == dtypes.int64
    np.testing.assert_array_equal(out.numpy(), x.numpy().astype(np.int64).sum(axis=axes, keepdims=keepdim))


@given(x=tensors(FLOATS + INTS, low=-3, high=3), data=st.data())  # small range: ties happen
def test_argmax_picks_first_of_ties(backend, x, data):
    if x.numel == 0:
        return
    if x.ndim == 0:
        assert x.argmax().item() == 0
        return
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    keepdim = data.draw(st.booleans())
    out = x.argmax(axis, keepdim=keepdim)
    assert out.dtype == dtypes.int64
    np.testing.assert_array_equal(out.numpy(), np.argmax(values(x), axis=axis, keepdims=keepdim))
    assert x.argmax().item() == int(np.argmax(values(x)))


def test_bool_sum_counts(backend):
    assert (Tensor([1, 5, 3]) > 2).sum().item() == 2


def test_reducing_an_empty_axis_with_max_fails_with_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 0\)"):
        Tensor.zeros(2, 0).max(1)
