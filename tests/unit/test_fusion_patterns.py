"""The matmul and attention fusions: each pattern the model records becomes one kernel, and the
fused graph computes what the unfused graph computes, on every backend (odd sizes, vector-width
tails, half weights, broadcast masks, grouped-query ratios 1/2/4/8)."""
import math

import numpy as np
from hypothesis import given, settings, strategies as st

from ops import dtypes
from tests.reference import ATOL, RTOL, summation_error
from tests.unit.test_passes import kernels, passes
from tinytensor import Tensor, graph, nn

WEIGHT_TYPES = [dtypes.float32, dtypes.bfloat16, dtypes.float16]


def normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@settings(deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 40), n=st.integers(1, 19), seed=st.integers(0, 2**16),
       weight_type=st.sampled_from(WEIGHT_TYPES), norm=st.booleans(), swiglu=st.booleans(), residual=st.booleans())
def test_linear_fusions_equal_the_unfused_graph(backend, m, k, n, seed, weight_type, norm, swiglu, residual):
    rng = np.random.default_rng(seed)
    x, g, r = Tensor(normal(rng, m, k)), Tensor(normal(rng, k)), Tensor(normal(rng, m, n))
    w1, w2 = (Tensor(normal(rng, n, k), dtype=weight_type) for _ in range(2))

    def layer():
        h = nn.rms_norm(x, g, 1e-5) if norm else x
        y = nn.linear(h, w1).silu() * nn.linear(h, w2) if swiglu else nn.linear(h, w1)
        return r + y if residual else y
    ops = kernels(layer())
    if norm or swiglu or residual:
        assert ops[-1] == "fused_linear" and "matmul" not in ops, ops
    with passes("none"):
        want = layer().numpy().astype(np.float64)
    got = layer().numpy().astype(np.float64)

    # Both sides round the same operations; they may add the k products (and the norm's k
    # squares) in another order: each sum is off by at most summation_error(k, sum of |terms|).
    h = x.numpy().astype(np.float64)
    if norm:
        h = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5) * g.numpy()
    sums = 3 if norm else 2  # the two products' orders, plus the norm's relative error
    error = [summation_error(k, sums * np.abs(h) @ np.abs(w.numpy().astype(np.float64)).T) for w in (w1, w2)]
    if swiglu:  # d(silu(a) * b) = silu'(a) b da + silu(a) db, with |silu'| < 1.1
        a, b = h @ w1.numpy().astype(np.float64).T, h @ w2.numpy().astype(np.float64).T
        error = [1.1 * np.abs(b) * error[0] + np.abs(a / (1 + np.exp(-a))) * error[1]]
    np.testing.assert_allclose(got, want, rtol=RTOL[dtypes.float32] * 4, atol=ATOL[dtypes.float32] + error[0].max())


@settings(deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 40), n=st.integers(1, 19), seed=st.integers(0, 2**16),
       weight_type=st.sampled_from(WEIGHT_TYPES))
def test_a_bias_and_gelu_after_a_linear_layer_are_its_epilogue(backend, m, k, n, seed, weight_type):
    """The Vision encoder's MLP: gelu(x @ W1.T + b1) is one kernel, as the unfused graph computes it
    (the same operations on each output element: only the product's order of summation differs)."""
    rng = np.random.default_rng(seed)
    x, b = Tensor(normal(rng, m, k)), Tensor(normal(rng, n))
    w = Tensor(normal(rng, n, k), dtype=weight_type)
    assert kernels(nn.linear(x, w, b).gelu()) == ["fused_linear"]
    with passes("none"):
        want = nn.linear(x, w, b).gelu().numpy().astype(np.float64)
    got = nn.linear(x, w, b).gelu().numpy().astype(np.float64)
    error = summation_error(k, 2 * np.abs(x.numpy().astype(np.float64)) @ np.abs(w.numpy().astype(np.float64)).T)
    # |gelu'| < 1.13: a sum off by e moves gelu by at most 1.13 e
    np.testing.assert_allclose(got, want, rtol=RTOL[dtypes.float32] * 4, atol=ATOL[dtypes.float32] + 1.13 * error.max())


@settings(deadline=None)
@given(kv_heads=st.integers(1, 2), ratio=st.sampled_from([1, 2, 4, 8]), q_len=st.integers(1, 6),
       extra_keys=st.integers(0, 40), head_dim=st.integers(1, 33),
       mask=st.sampled_from([None, "bool", "add", "causal"]), seed=st.integers(0, 2**16))
def test_attention_fusion_equals_the_unfused_graph(backend, kv_heads, ratio, q_len, extra_keys, head_dim, mask, seed):
    rng = np.random.default_rng(seed)
    k_len = q_len + extra_keys
    q = Tensor(normal(rng, kv_heads * ratio, q_len, head_dim))
    k, v = (Tensor(normal(rng, kv_heads, k_len, head_dim)) for _ in range(2))
    masks = {None: None, "causal": None, "bool": Tensor(rng.random((q_len, k_len)) < 0.8),
             "add": Tensor(normal(rng, q_len, k_len))}

    def attend():
        return nn.scaled_dot_product_attention(q, k, v, attn_mask=masks[mask], is_causal=mask == "causal")
    ops = kernels(attend())
    assert ops.count("attention") == 1 and "matmul" not in ops and "exp" not in ops, ops
    with passes("none"):
        want = attend().numpy().astype(np.float64)
    got = attend().numpy().astype(np.float64)

    # Scores may differ by two dot-product orders; exp is within a few ulp on both sides (RTOL);
    # the weighted sum of v may add in another order.
    q64, k64, v64 = (t.numpy().astype(np.float64) for t in (q, k, v))
    score_error = 2 * summation_error(head_dim, np.abs(q64).max() * np.abs(k64).max() * head_dim) / math.sqrt(head_dim)
    vmax = np.abs(v64).max()
    atol = (2 * score_error + RTOL[dtypes.float32] + 2 * summation_error(k_len, 1)) * vmax + ATOL[dtypes.float32]
    np.testing.assert_allclose(got, want, rtol=RTOL[dtypes.float32], atol=atol, equal_nan=True)


def test_a_fully_masked_row_is_nan_as_in_the_unfused_softmax(backend):
    q, k = Tensor.randn(2, 3, 4, seed=1), Tensor.randn(1, 5, 4, seed=2)
    mask = Tensor(np.array([[True] * 5, [False] * 5, [True, False, True, False, True]]))
    out = nn.scaled_dot_product_attention(q, k, k, attn_mask=mask).numpy()
    assert np.isnan(out[:, 1]).all() and not np.isnan(out[:, [0, 2]]).any()


def test_a_value_read_elsewhere_is_not_fused_away():
    x, w = Tensor.randn(3, 8, seed=1), Tensor.randn(5, 8, seed=2)
    h = nn.linear(x, w)
    out = h.silu() * h + h.sum()  # the product has readers besides the epilogue
    assert "matmul" in kernels(out)


def test_each_pass_can_be_switched_off():
    x, g, w = Tensor.randn(3, 8, seed=1), Tensor.randn(8, seed=2), Tensor.randn(5, 8, seed=3)
    with passes("fold_matmul_casts,fuse_attention,fuse_elementwise"):
        assert "fused_linear" not in kernels(nn.linear(nn.rms_norm(x, g), w))
    q = Tensor.randn(2, 3, 4, seed=4)
    with passes("fuse_linear,fuse_elementwise"):
        assert "attention" not in kernels(nn.scaled_dot_product_attention(q, q, q))


@settings(deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 24), widths=st.lists(st.integers(1, 13), min_size=2, max_size=3),
       norm=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_layers_of_one_input_become_one_kernel(backend, m, k, widths, norm, seed):
    rng = np.random.default_rng(seed)
    x, g = Tensor(normal(rng, m, k)), Tensor(normal(rng, k))
    weights = [Tensor(normal(rng, n, k)) for n in widths]

    def layers():
        h = nn.rms_norm(x, g, 1e-5) if norm else x
        return [nn.linear(h, w) for w in weights]
    schedule, _ = graph.plan([t.node for t in layers()])
    if norm:  # without a norm the products stay plain matmuls: no pass touches them
        assert [n.op for n in schedule.nodes].count("fused_linear") == 1
    with passes("none"):
        want = [t.numpy() for t in realized(layers())]
    got = [t.numpy() for t in realized(layers())]
    h = x.numpy().astype(np.float64)
    if norm:
        h = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5) * g.numpy()
    for ours, theirs, w in zip(got, want, weights):  # summation orders, as in the test above
        error = summation_error(k, (3 if norm else 2) * np.abs(h) @ np.abs(w.numpy().astype(np.float64)).T)
        np.testing.assert_allclose(ours, theirs, rtol=RTOL[dtypes.float32] * 4, atol=ATOL[dtypes.float32] + error.max())


def realized(tensors):
    """The tensors, computed in one graph."""
    tensors[0].realize(*tensors[1:])
    return tensors


def test_a_llama_block_is_nine_kernels(backend, capsys, monkeypatch):
    """QKV (with the norm), RoPE of q, RoPE of k, the two cache writes, attention, out-projection
    + residual, SwiGLU (with the norm), down-projection + residual."""
    from models.formats.checkpoint import random_weights
    from models.llama3.config import LlamaConfig
    from models.llama3 import KVCache, Llama

    def decode_step_kernels(layers):
        config = LlamaConfig(dim=64, n_layers=layers, n_heads=8, n_kv_heads=2, vocab_size=100, ffn_dim=96)
        model = Llama(config, random_weights(config), context=32)
        out = model.forward(Tensor([1]), Tensor([3]), KVCache.allocate(config, 16))
        schedule, _ = graph.plan([out.node])
        return [n.op for n in schedule.nodes if n.op not in ("reshape", "permute", "expand", "shrink")]
    one, two = decode_step_kernels(1), decode_step_kernels(2)
    block = list(two)
    for op in one:
        block.remove(op)
    assert sorted(block) == sorted(["fused_linear"] * 4 + ["fused"] * 2 + ["assign_at"] * 2 + ["attention"]), block
    monkeypatch.setenv("TT_DEBUG", "1")
    Tensor.randn(2, 64, seed=1).realize()
    assert "randn" in capsys.readouterr().err
