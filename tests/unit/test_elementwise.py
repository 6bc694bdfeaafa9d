"""Elementwise ops against float64 NumPy, over drawn shapes, dtypes and values."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from ops import dtypes
from ops.elementwise import erf
from tests.reference import FLOATS, INTS, assert_close, float_arrays, int_arrays, tensors, values
from tinytensor import Tensor


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


UNARY = {  # name: (NumPy meaning, low, high) with the domain where the function is finite
    "neg": (np.negative, -8, 8),
    "exp": (np.exp, -8, 8),
    "log": (np.log, 1e-3, 100),
    "sqrt": (np.sqrt, 0, 100),
    "rsqrt": (lambda x: 1 / np.sqrt(x), 1e-3, 100),
    "sin": (np.sin, -8, 8),
    "cos": (np.cos, -8, 8),
    "tanh": (np.tanh, -8, 8),
    "abs": (np.abs, -8, 8),
    "relu": (lambda x: np.maximum(x, 0), -8, 8),
    "sigmoid": (_sigmoid, -30, 30),
    "silu": (lambda x: x * _sigmoid(x), -30, 30),
    "gelu": (lambda x: x * 0.5 * (1 + erf(x / np.sqrt(2))), -30, 30),
}


@pytest.mark.parametrize("name", UNARY)
@given(data=st.data())
def test_unary_matches_numpy(backend, name, data):
    fn, low, high = UNARY[name]
    x = data.draw(tensors(low=low, high=high))
    assert_close(getattr(x, name)(), fn(values(x)))


def test_exp_over_the_whole_float32_range(backend):
    """Overflow to inf, gradual underflow to subnormals and 0, inf/-inf/nan, and the 1e-5
    relative bound of RTOL everywhere in between (the LLVM kernels compute exp themselves)."""
    x = np.concatenate([np.linspace(-110, 95, 20001, dtype=np.float32),
                        np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 88.72, -87.34, -103.9], np.float32)])
    got = Tensor(x).exp().numpy().astype(np.float64)
    want = np.exp(x.astype(np.float64))
    want = np.where(want > np.finfo(np.float32).max, np.inf, want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2.0**-149, equal_nan=True)


def test_erf_matches_the_c_library_to_float64_precision():
    """ops.elementwise.erf (NumPy has none) against math.erf, over its whole range and the
    special values; GELU's reference meaning rests on it."""
    import math
    x = np.concatenate([np.linspace(-9, 9, 20001), [0.0, -0.0, 1e-300, 1e-8, np.inf, -np.inf]])
    want = np.array([math.erf(v) for v in x])
    # term n of the series carries n roundings from its recurrence; the terms that make the sum sit
    # near n = x^2 <= 36; exp and the last products add a few: 64 eps bounds it (8 seen)
    np.testing.assert_allclose(erf(x), want, rtol=64 * np.finfo(np.float64).eps, atol=0)
    assert np.isnan(erf(np.nan))


def test_gelu_is_x_times_phi(backend):
    """The activation of Llama 3.2 Vision's encoder (PyTorch's default, exact-erf GELU), against
    x/2 (1 + erf(x/sqrt 2)) in float64 with the C library's erf. In float32 the erf carries one
    rounding (<= 2^-24 near +-1) which 1 + erf keeps as an absolute error, times |x|/2; the
    products round 3 times. (PyTorch's own float32 erf is ~8 ulp off near -1: 1.5e-4 relative
    at x = -2.9, so it is not the yardstick here.)"""
    import math
    x = np.linspace(-12, 12, 40001, dtype=np.float32)
    want = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    got = Tensor(x).gelu().numpy().astype(np.float64)
    bound = 4 * np.finfo(np.float32).eps * np.abs(want) + np.abs(x) * 2.0 ** -25 + 2.0 ** -149
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


@pytest.mark.parametrize("name", ["exp", "sqrt", "sigmoid"])
def test_unary_float_function_of_int_gives_float32(backend, name):
    x = Tensor([1, 2, 3])
    out = getattr(x, name)()
    assert out.dtype == dtypes.float32
    assert_close(out, UNARY[name][0](np.array([1.0, 2.0, 3.0])))


BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
    "maximum": (lambda a, b: a.maximum(b), np.maximum),
    "minimum": (lambda a, b: a.minimum(b), np.minimum),
}
COMPARE = {
    "lt": (lambda a, b: a < b, np.less),
    "le": (lambda a, b: a <= b, np.less_equal),
    "gt": (lambda a, b: a > b, np.greater),
    "ge": (lambda a, b: a >= b, np.greater_equal),
    "eq": (lambda a, b: a == b, np.equal),
    "ne": (lambda a, b: a != b, np.not_equal),
}


@st.composite
def broadcast_pair(draw, dtype_choices=FLOATS, low=-8.0, high=8.0):
    dtype = draw(st.sampled_from(dtype_choices))
    sa, sb = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4)).input_shapes
    return (draw(tensors([dtype], sa, low, high)), draw(tensors([dtype], sb, low, high)))


@pytest.mark.parametrize("name", BINARY)
@given(data=st.data())
def test_binary_float_broadcasts_like_numpy(backend, name, data):
    a, b = data.draw(broadcast_pair())
    op, ref = BINARY[name]
    assert_close(op(a, b), ref(values(a), values(b)))


@pytest.mark.parametrize("name", BINARY)
@given(data=st.data())
def test_binary_int_is_exact(backend, name, data):
    a, b = data.draw(broadcast_pair(INTS, -100, 100))
    op, ref = BINARY[name]
    out = op(a, b)
    assert out.dtype == a.dtype
    assert_close(out, ref(a.numpy(), b.numpy()))


@given(data=st.data())
def test_div_matches_numpy(backend, data):
    a, b = data.draw(broadcast_pair())
    with np.errstate(divide="ignore", invalid="ignore"):
        want = values(a) / values(b)
    assert_close(a / b, want)


def test_int_division_is_true_division(backend):
    out = Tensor([7, -7, 1]) / Tensor([2, 2, 0])
    assert out.dtype == dtypes.float32
    np.testing.assert_array_equal(out.numpy(), [3.5, -3.5, np.inf])


@given(data=st.data())
def test_pow_matches_numpy(backend, data):
    dtype = data.draw(st.sampled_from(FLOATS))
    sa, sb = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=4)).input_shapes
    a = data.draw(tensors([dtype], sa, 0.1, 4.0))
    b = data.draw(tensors([dtype], sb, -3.0, 3.0))
    assert_close(a ** b, values(a) ** values(b))


@pytest.mark.parametrize("name", COMPARE)
@given(data=st.data())
def test_comparisons_give_bool(backend, name, data):
    a, b = data.draw(broadcast_pair(FLOATS + INTS, -3, 3))  # small range: ties happen
    op, ref = COMPARE[name]
    out = op(a, b)
    assert out.dtype == dtypes.bool_
    np.testing.assert_array_equal(out.numpy(), ref(values(a), values(b)))


@given(data=st.data())
def test_where_broadcasts_three_ways(backend, data):
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=4, max_side=4)).input_shapes
    cond = Tensor(data.draw(hnp.arrays(np.bool_, shapes[0])))
    dtype = data.draw(st.sampled_from(FLOATS))
    x, y = data.draw(tensors([dtype], shapes[1])), data.draw(tensors([dtype], shapes[2]))
    assert_close(cond.where(x, y), np.where(cond.numpy(), values(x), values(y)))


def test_where_takes_numbers(backend):
    cond = Tensor([True, False, True])
    np.testing.assert_array_equal(cond.where(1.0, Tensor([5.0, 6.0, 7.0])).numpy(), [1, 6, 1])
    np.testing.assert_array_equal(cond.where(Tensor([5, 6, 7]), 0).numpy(), [5, 0, 7])


@given(data=st.data())
def test_python_numbers_take_the_tensor_dtype(backend, data):
    x = data.draw(tensors(FLOATS))
    assert_close(2.5 * x + 1, 2.5 * values(x) + 1, roundings=2)
    assert (x * 3).dtype == x.dtype and (3 - x).dtype == x.dtype


def test_mixed_dtypes_promote(backend):
    assert (Tensor([1, 2]) + Tensor([0.5, 0.5])).dtype == dtypes.float32
    assert (Tensor([1.0], dtype="float16") + Tensor([1.0], dtype="bfloat16")).dtype == dtypes.float32
    assert (Tensor([1], dtype="int8") + Tensor([1], dtype="int32")).dtype == dtypes.int32
    assert (Tensor([1, 2]) + 0.5).dtype == dtypes.float32
    np.testing.assert_array_equal((Tensor([1, 2]) + 0.5).numpy(), [1.5, 2.5])


CASTS = FLOATS + INTS + [dtypes.bool_]


@pytest.mark.parametrize("to", CASTS, ids=lambda d: d.name)
@given(data=st.data())
def test_cast_float_to_any(backend, to, data):
    x = data.draw(tensors(FLOATS, low=-100, high=100))
    v = values(x)
    if to.is_float:
        want = v
    elif to == dtypes.bool_:
        want = v != 0
    else:
        want = np.trunc(v).astype(to.storage)  # truncation toward zero, as C and PyTorch do
    assert_close(x.cast(to), want, dtype=to if to.is_float else None)


@given(data=st.data())
def test_cast_int_to_float(backend, data):
    dtype = data.draw(st.sampled_from(INTS))
    x = Tensor(data.draw(int_arrays(data.draw(hnp.array_shapes(min_dims=0, max_dims=3)), dtype)), dtype=dtype)
    to = data.draw(st.sampled_from(FLOATS))
    assert_close(x.cast(to), x.numpy().astype(np.float64))


@given(x=float_arrays(hnp.array_shapes(max_dims=2), -1e4, 1e4))
def test_bfloat16_rounds_to_nearest_even(x):
    got = Tensor(x, dtype="bfloat16").node.buffer
    bits = x.view(np.uint32).astype(np.int64)
    down, up = bits >> 16, (bits >> 16) + 1
    lower, upper = (down << 16).astype(np.uint32).view(np.float32), (up << 16).astype(np.uint32).view(np.float32)
    dist_down, dist_up = np.abs(x.astype(np.float64) - lower), np.abs(upper.astype(np.float64) - x)
    pick_up = (dist_up < dist_down) | ((dist_up == dist_down) & (down % 2 == 1))
    np.testing.assert_array_equal(got, np.where(pick_up, up, down).astype(np.uint16))


def test_bfloat16_keeps_nan_and_inf():
    x = Tensor([np.nan, np.inf, -np.inf, 3.4e38], dtype="bfloat16").numpy()
    assert np.isnan(x[0]) and x[1] == np.inf and x[2] == -np.inf and x[3] == np.inf  # 3.4e38 rounds up
