"""Block-quantised weights (ops/blocks.py): each format's meaning against the `gguf` package
(llama.cpp's own Python reference), and the products that read them as stored, with every
fusion, on both backends, against float32 arithmetic on the dequantised weights."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from ops import dtypes
from tinytensor import Tensor, nn

FORMATS = dtypes.BLOCKS
EPS = np.finfo(np.float32).eps


def stored(rng, shape, dtype, spread=1.0):
    """(the bytes of a random matrix quantised to dtype, the values they mean)."""
    w = (rng.standard_normal(shape) * spread).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType(dtype.block.ggml_type))
    return raw, dequantize(raw, GGMLQuantizationType(dtype.block.ggml_type)).astype(np.float32)


def bound(x, w):
    """How far two float32 summation orders of x @ w.T may differ: K units of rounding on the
    sum of the absolute products (the textbook bound for a reordered dot product), plus one
    rounding of the result."""
    return (x.shape[-1] + 1) * EPS * (np.abs(x) @ np.abs(w).T) + 1e-30


@pytest.mark.parametrize("dtype", FORMATS, ids=lambda d: d.name)
def test_meaning_is_ggufs_dequantisation(dtype):
    rng = np.random.default_rng(1)
    for spread in (1.0, 1e-3, 300.0):  # small and large scales, and for q5 every fifth bit
        raw, want = stored(rng, (7, 256), dtype, spread)
        got = dtypes.widen(raw, dtype)
        assert got.dtype == np.float32 and np.array_equal(got, want)
    t = Tensor.from_numpy(raw, dtype)
    assert t.shape == (7, 256) and np.array_equal(t.numpy(), want)


@pytest.mark.parametrize("dtype", FORMATS, ids=lambda d: d.name)
@pytest.mark.parametrize("m, n, k", [(1, 37, 32), (1, 8, 96), (3, 13, 64), (5, 6, 160), (9, 17, 32)])
def test_product_reads_blocks_as_stored(backend, dtype, m, n, k):
    """x @ W.T for decode (one row) and prefill shapes, with row and column tails."""
    rng = np.random.default_rng(m * 1000 + n + k)
    raw, w = stored(rng, (n, k), dtype)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = nn.linear(Tensor(x), Tensor.from_numpy(raw, dtype)).numpy()
    assert got.shape == (m, n)
    assert np.all(np.abs(got - x @ w.T) <= bound(x, w))


@pytest.mark.parametrize("m", [1, 6])
def test_every_fusion_reads_blocks(backend, m):
    """The model's fusions on quantised weights, formats mixed as Q4_K_M-style files mix them:
    RMSNorm prologue with Q, K and V side by side, SwiGLU over two weights, residual epilogue."""
    rng = np.random.default_rng(m)
    dim, ffn, eps = 64, 96, 1e-5
    x = rng.standard_normal((m, dim)).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    (wq, q), (wk, kk), (wv, v) = (stored(rng, (n, dim), d) for n, d in
                                  ((64, dtypes.q4_0), (32, dtypes.q8_0), (32, dtypes.q5_1)))
    (wg, gate), (wu, up) = stored(rng, (ffn, dim), dtypes.q4_1), stored(rng, (ffn, dim), dtypes.q4_1)
    wd, down = stored(rng, (dim, ffn), dtypes.q5_0)
    T = Tensor.from_numpy
    h = nn.rms_norm(Tensor(x), Tensor(g), eps)
    qkv = [nn.linear(h, T(raw, d)) for raw, d in ((wq, dtypes.q4_0), (wk, dtypes.q8_0), (wv, dtypes.q5_1))]
    hidden = nn.linear(h, T(wg, dtypes.q4_1)).silu() * nn.linear(h, T(wu, dtypes.q4_1))
    out = Tensor(x) + nn.linear(hidden, T(wd, dtypes.q5_0))
    out.realize(*qkv)  # one graph, so the fusions see every reader

    # exact (float64) values, and how far float32 may carry each from them: the norm's sum of
    # squares (dim roundings, halved by the square root, then 4 more), each product's bound,
    # silu (|silu'| <= 1.1, and 4 roundings) times up, and the last product and residual add
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    normed = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * g64
    d_normed = (dim / 2 + 4) * EPS * np.abs(normed)
    for product, w in zip(qkv, (q, kk, v)):
        assert np.all(np.abs(product.numpy() - normed @ w.T) <= bound(normed, w) + d_normed @ np.abs(w).T)
    a, b = normed @ gate.T, normed @ up.T
    d_a, d_b = (bound(normed, w) + d_normed @ np.abs(w).T for w in (gate, up))
    silu = a / (1 + np.exp(-a))
    h64 = silu * b
    d_h = 1.1 * np.abs(b) * d_a + np.abs(silu) * d_b + 4 * EPS * np.abs(h64)
    want = x64 + h64 @ down.T
    assert np.all(np.abs(out.numpy() - want) <= bound(h64, down) + d_h @ np.abs(down).T + EPS * np.abs(want))


@pytest.mark.parametrize("dtype", [dtypes.q8_0, dtypes.q4_1], ids=lambda d: d.name)
def test_embedding_reads_only_its_rows(backend, dtype):
    rng = np.random.default_rng(3)
    raw, w = stored(rng, (50, 64), dtype)
    ids = np.array([4, 0, 49, 4], np.int64)
    rows = nn.embedding(Tensor(ids), Tensor.from_numpy(raw, dtype))
    assert rows.dtype == dtype  # still blocks: the cast after it dequantises four rows
    assert np.array_equal(rows.cast(dtypes.float32).numpy(), w[ids])


def test_blocks_are_weights_not_values():
    raw, _ = stored(np.random.default_rng(0), (4, 32), dtypes.q4_0)
    w = Tensor.from_numpy(raw, dtypes.q4_0)
    with pytest.raises(ValueError, match="q4_0 tensor: block-quantised weights can be read by rows"):
        w.exp()
    with pytest.raises(ValueError, match="cast it to float32 first"):
        w.sum()
    with pytest.raises(ValueError, match="cannot cast to q8_0"):
        Tensor(np.ones((2, 32), np.float32)).cast(dtypes.q8_0)
    assert np.allclose((w.cast(dtypes.float32) * 2).numpy(), 2 * dtypes.widen(raw, dtypes.q4_0))


def test_swiglu_of_a_block_and_a_float_weight(backend):
    """A gate in blocks beside an up projection in float16 (files mix types): each is its own
    product, each within its bound."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    raw, gate = stored(rng, (32, 64), dtypes.q4_0)
    up = rng.standard_normal((32, 64)).astype(np.float16)
    got = (nn.linear(Tensor(x), Tensor.from_numpy(raw, dtypes.q4_0)).silu()
           * nn.linear(Tensor(x), Tensor.from_numpy(up, dtypes.float16))).numpy()
    x64, up64 = x.astype(np.float64), up.astype(np.float64)
    a, b = x64 @ gate.T, x64 @ up64.T
    silu = a / (1 + np.exp(-a))
    reach = 1.1 * np.abs(b) * bound(x64, gate) + np.abs(silu) * bound(x64, up64) + 4 * EPS * np.abs(silu * b)
    assert np.all(np.abs(got - silu * b) <= reach)
