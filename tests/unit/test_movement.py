"""Movement ops move bits, so they must be exact for every dtype."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

from tests.reference import FLOATS, INTS, shapes, tensors
from tinytensor import Tensor

ALL = FLOATS + INTS


def exact(got: Tensor, want: np.ndarray):
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


@given(x=tensors(ALL), data=st.data())
def test_reshape_any_factorisation(backend, x, data):
    dims = data.draw(st.permutations(list(x.shape) + [1]))
    if len(dims) > 1 and x.numel:
        infer = data.draw(st.integers(0, len(dims) - 1))
        dims = list(dims)
        dims[infer] = -1
    want = x.numpy().reshape(dims)
    exact(x.reshape(dims), want)
    exact(x.flatten(), x.numpy().reshape(-1))


@given(x=tensors(ALL), data=st.data())
def test_permute_and_transpose(backend, x, data):
    order = data.draw(st.permutations(range(x.ndim)))
    exact(x.permute(order), np.transpose(x.numpy(), order))
    if x.ndim >= 2:
        exact(x.transpose(0, -1), np.swapaxes(x.numpy(), 0, -1))
        exact(x.transpose(), np.swapaxes(x.numpy(), -2, -1))
    exact(x.T, x.numpy().T)


@given(data=st.data())
def test_expand_broadcasts(backend, data):
    drawn = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4))
    x, target = data.draw(tensors(ALL, drawn.input_shapes[0])), drawn.result_shape
    exact(x.expand(target), np.broadcast_to(x.numpy(), target))


def test_expand_keeps_sizes_given_as_minus_one(backend):
    assert Tensor.ones(3, 1).expand(2, -1, 4).shape == (2, 3, 4)


@given(x=tensors(ALL, shapes(min_side=1)), data=st.data())
def test_squeeze_unsqueeze(backend, x, data):
    axis = data.draw(st.integers(-x.ndim - 1, x.ndim))
    exact(x.unsqueeze(axis), np.expand_dims(x.numpy(), axis))
    exact(x.squeeze(), np.squeeze(x.numpy()))
    if x.ndim:
        a = data.draw(st.integers(-x.ndim, x.ndim - 1))
        want = np.squeeze(x.numpy(), a) if x.shape[a] == 1 else x.numpy()
        exact(x.squeeze(a), want)


@given(x=tensors(ALL), data=st.data())
def test_contiguous_copies_values(backend, x, data):
    order = data.draw(st.permutations(range(x.ndim)))
    exact(x.permute(order).contiguous(), np.array(np.transpose(x.numpy(), order), order="C"))


@given(x=tensors(ALL, shapes(min_dims=1, max_dims=3)), data=st.data())
def test_pad_with_value(backend, x, data):
    pads = [data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2))) for _ in range(x.ndim)]
    value = data.draw(st.sampled_from([0, 1, -2]))
    exact(x.pad(pads, value), np.pad(x.numpy(), pads, constant_values=value))


@given(data=st.data())
def test_cat_along_any_axis(backend, data):
    base = data.draw(shapes(min_dims=1, max_dims=3))
    axis = data.draw(st.integers(-len(base), len(base) - 1))
    dtype = data.draw(st.sampled_from(ALL))
    parts = []
    for _ in range(data.draw(st.integers(1, 4))):
        shape = list(base)
        shape[axis] = data.draw(st.integers(0, 3))
        parts.append(data.draw(tensors([dtype], tuple(shape))))
    exact(Tensor.cat(*parts, axis=axis), np.concatenate([p.numpy() for p in parts], axis=axis))


@given(data=st.data())
def test_stack_adds_an_axis(backend, data):
    shape = data.draw(shapes(max_dims=3))
    dtype = data.draw(st.sampled_from(ALL))
    parts = [data.draw(tensors([dtype], shape)) for _ in range(data.draw(st.integers(1, 3)))]
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    exact(parts[0].stack(*parts[1:], axis=axis), np.stack([p.numpy() for p in parts], axis=axis))


def test_reshape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 2\)"):
        Tensor.zeros(2, 3).reshape(4, 2)


def test_cat_error_names_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        Tensor.cat(Tensor.zeros(2, 3), Tensor.zeros(2, 4), axis=0)


def test_broadcast_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4,\)"):
        Tensor.zeros(2, 3) + Tensor.zeros(4)


@given(x=tensors(ALL, shapes(min_dims=1)))
def test_movement_keeps_element_count(backend, x):
    assert x.flatten().shape == (math.prod(x.shape),)
    assume(x.ndim >= 2)
    assert x.transpose().numel == x.numel
