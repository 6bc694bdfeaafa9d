"""nn functions against direct float64 NumPy versions of their textbook definitions."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from ops import dtypes
from tests.reference import FLOATS, assert_close, shapes, summation_error, tensors, values
from tinytensor import Tensor, nn


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@given(x=tensors(FLOATS, shapes(min_dims=1, min_side=1), -20, 20), data=st.data())
def test_softmax(backend, x, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    n = x.shape[axis]
    # float32 exp (few ulp) and a sum of n terms, then the division: n-term summation on values <= 1
    assert_close(x.softmax(axis), np_softmax(values(x), axis), roundings=2, atol=summation_error(n, n))


@given(x=tensors(FLOATS, shapes(min_dims=1, min_side=1), -20, 20), data=st.data())
def test_log_softmax(backend, x, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    v = values(x)
    shifted = v - v.max(axis=axis, keepdims=True)
    want = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    # |result| grows to ~40 here: relative error of the log term on that scale
    assert_close(nn.log_softmax(x, axis), want, roundings=2, atol=summation_error(x.shape[axis], 40))


@given(x=tensors(FLOATS, shapes(min_dims=1, min_side=1)), data=st.data())
def test_rms_norm(backend, x, data):
    weight = data.draw(tensors([x.dtype], x.shape[-1:]))
    v, w = values(x), values(weight)
    normed = v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-5)
    # two roundings to x's dtype: after normalising, after scaling (as in Meta's RMSNorm)
    assert_close(nn.rms_norm(x, weight, eps=1e-5), normed * w, roundings=3,
                 atol=summation_error(x.shape[-1], 64) * 8)


def test_layer_norm_matches_torch(backend):
    """PyTorch's LayerNorm (Llama 3.2 Vision's encoder) in float32: mean, biased variance, eps
    inside the root, weight and bias; rows of 1280 as there, some far from zero mean. The two
    mean reductions each sum 1280 terms, the rest is a few roundings per element."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 1280)) * rng.uniform(0.1, 30, (7, 1)) + rng.uniform(-50, 50, (7, 1)))
    x, w, b = x.astype(np.float32), rng.standard_normal(1280).astype(np.float32), rng.standard_normal(1280).astype(np.float32)
    tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
    want = torch.nn.functional.layer_norm(tx, (1280,), tw, tb, eps=1e-5).numpy()
    got = nn.layer_norm(Tensor(x), Tensor(w), Tensor(b), 1e-5).numpy()
    # each side's mean carries up to summation_error(n, mean |x|), which centring turns into that
    # over the row's std in every normalised value (times |w|); the variance's sum of n squares
    # (relative error n eps) and the last roundings add a few eps of (|w| + |b|) * O(3)
    x64 = x.astype(np.float64)
    shift = summation_error(1280, np.abs(x64).mean(-1, keepdims=True)) / x64.std(-1, keepdims=True)
    bound = 2 * np.abs(w) * (shift + 3 * summation_error(1280, 1)) + 8 * 2.0 ** -24 * (3 * np.abs(w) + np.abs(b))
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


@given(data=st.data())
def test_linear_uses_pytorch_weight_layout(backend, data):
    dtype = data.draw(st.sampled_from(FLOATS))
    batch, n_in, n_out = data.draw(shapes(max_dims=2, min_side=1)), data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    x = data.draw(tensors([dtype], batch + (n_in,), -2, 2))
    w = data.draw(tensors([dtype], (n_out, n_in), -2, 2))
    b = data.draw(tensors([dtype], (n_out,), -2, 2))
    want = values(x) @ values(w).T + values(b)
    assert_close(nn.linear(x, w, b), want, roundings=2, atol=summation_error(n_in, 4 * n_in))


@given(data=st.data())
def test_embedding_picks_rows(backend, data):
    vocab, dim = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 5))
    weight = data.draw(tensors(FLOATS, (vocab, dim)))
    ids = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8)))
    ids = ids.reshape(data.draw(st.sampled_from([(len(ids),), (1, len(ids))])))
    np.testing.assert_array_equal(nn.embedding(Tensor(ids), weight).numpy(), weight.numpy()[ids])


def meta_rotary(x, cos, sin):
    """Meta's llama reference: view pairs as complex numbers and multiply by e^(i*theta)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    z = (pairs[..., 0] + 1j * pairs[..., 1]) * (cos + 1j * sin)
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


@given(data=st.data())
def test_rotary_embedding_matches_metas_complex_form(backend, data):
    dtype = data.draw(st.sampled_from(FLOATS))
    seq, heads, half = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    x = data.draw(tensors([dtype], (2, seq, heads, 2 * half)))
    angles = np.arange(seq)[:, None] * 10000.0 ** (-np.arange(half) / half)  # [seq, half]
    cos = Tensor(np.cos(angles)[:, None, :])  # broadcasts over heads
    sin = Tensor(np.sin(angles)[:, None, :])
    want = meta_rotary(values(x), np.cos(angles)[:, None, :], np.sin(angles)[:, None, :])
    assert_close(nn.rotary_embedding(x, cos, sin), want, roundings=2, atol=2 * 8 * 2.0**-23)


def np_attention(q, k, v, causal, mask=None):
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)  # Llama's repeat_kv
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    lq, lk = q.shape[-2], k.shape[-2]
    if causal:
        scores = np.where(np.tril(np.ones((lq, lk), bool), k=lk - lq), scores, -np.inf)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    return np_softmax(scores, -1) @ v


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@given(data=st.data())
def test_attention_grouped_query_causal(backend, group, data):
    dtype = data.draw(st.sampled_from(FLOATS))
    kv_heads, lk, d = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 7)), data.draw(st.sampled_from([1, 4, 8]))
    lq = data.draw(st.integers(1, lk))  # fewer queries than keys: a decode step over a cache
    batch = data.draw(st.sampled_from([(), (2,)]))
    q = data.draw(tensors([dtype], batch + (kv_heads * group, lq, d), -2, 2))
    k = data.draw(tensors([dtype], batch + (kv_heads, lk, d), -2, 2))
    v = data.draw(tensors([dtype], batch + (kv_heads, lk, d), -2, 2))
    causal = data.draw(st.booleans())
    want = np_attention(values(q), values(k), values(v), causal)
    got = nn.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close(got, want, roundings=2, atol=summation_error(lk, 4 * d + 2 * lk))


def test_attention_boolean_mask_per_head(backend):
    q, k, v = Tensor.randn(1, 4, 3, 8, seed=1), Tensor.randn(1, 2, 5, 8, seed=2), Tensor.randn(1, 2, 5, 8, seed=3)
    mask = np.random.default_rng(0).random((1, 4, 3, 5)) > 0.3
    mask[..., 0] = True  # every query sees something
    want = np_attention(values(q), values(k), values(v), False, mask)
    assert_close(nn.scaled_dot_product_attention(q, k, v, attn_mask=Tensor(mask)), want, roundings=2,
                 atol=summation_error(5, 40))


def test_attention_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match=r"\(1, 3, 2, 4\).*\(1, 2, 2, 4\)"):
        nn.scaled_dot_product_attention(Tensor.zeros(1, 3, 2, 4), Tensor.zeros(1, 2, 2, 4), Tensor.zeros(1, 2, 2, 4))


def test_softmax_of_half_types_rounds_once(backend):
    x = Tensor([0.1, 0.2, 0.3, 0.4], dtype=dtypes.bfloat16)
    assert nn.softmax(x).dtype == dtypes.bfloat16
    want = np_softmax(values(x), -1)
    assert_close(nn.softmax(x), want)  # one rounding: computed in float32 inside
