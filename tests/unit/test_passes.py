"""Fusion passes: a fused graph computes what the unfused graph computes, on every backend, and
it really has fewer kernels."""
import os
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from ops import dtypes
from tests.reference import ATOL, FLOATS, RTOL, summation_error, tensors
from tinytensor import Tensor, graph, nn

UNARY = ["exp", "neg", "abs", "relu", "sigmoid", "silu", "tanh", "sin"]
BINARY = [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a - b, lambda a, b: a.maximum(b),
          lambda a, b: (a > b).where(a, b), lambda a, b: a * 0.5 + b]


@st.composite
def expressions(draw):
    """A random elementwise DAG over 1-3 inputs of broadcastable shapes (odd sizes, size 1)."""
    dtype = draw(st.sampled_from(FLOATS))
    shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=draw(st.integers(1, 3)), min_dims=1,
                                                    max_dims=3, max_side=9)).input_shapes
    inputs = [draw(tensors([dtype], s, -2, 2)) for s in shapes]
    steps = draw(st.lists(st.tuples(st.booleans(), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)),
                          min_size=1, max_size=8))
    return inputs, steps


def build(inputs, steps):
    values = list(inputs)
    for unary, op, i, j in steps:
        if unary:
            values.append(getattr(values[i % len(values)], UNARY[op % len(UNARY)])())
        else:
            values.append(BINARY[op % len(BINARY)](values[i % len(values)], values[j % len(values)]))
    return values[-1]


@contextmanager
def passes(value: str):
    old = os.environ.get("TT_PASSES")
    os.environ["TT_PASSES"] = value
    try:
        yield
    finally:
        os.environ.pop("TT_PASSES") if old is None else os.environ.__setitem__("TT_PASSES", old)


@given(case=expressions(), reduce=st.sampled_from([None, "sum", "max"]))
def test_fused_graph_equals_unfused(backend, case, reduce):
    inputs, steps = case

    def make():
        out = build(inputs, steps)
        return getattr(out, reduce)(-1) if reduce else out
    with passes("none"):
        plain = make()
    fused = make()
    want, got = plain.numpy().astype(np.float64), fused.numpy().astype(np.float64)
    # the same operations with the same roundings; a sum may add its terms in another order
    terms = build(inputs, steps).shape[-1] if reduce == "sum" else 1
    atol = ATOL[fused.dtype] + summation_error(terms, np.abs(want).max(initial=0) * terms)
    np.testing.assert_allclose(got, want, rtol=RTOL[fused.dtype], atol=atol, equal_nan=True)


def kernels(t: Tensor) -> list[str]:
    schedule, _ = graph.plan([t.node])
    return [n.op for n in schedule.nodes if n.op not in ("reshape", "permute", "expand", "shrink")]


def test_a_chain_becomes_one_kernel():
    x = Tensor.randn(5, 7, seed=0)
    assert kernels(((x * 2 + 1).exp() - x).silu()) == ["randn", "fused"]


def test_a_reduction_absorbs_the_chain_that_feeds_it():
    x = Tensor.randn(5, 7, seed=0)
    assert kernels((x * x + 1).sum(-1)) == ["randn", "fused_reduce"]


def test_a_value_read_twice_is_not_duplicated():
    x = Tensor.randn(5, 7, seed=0)
    shared = (x * 3).exp()
    out = shared.sum(-1, keepdim=True) + shared.max(-1, keepdim=True)
    assert kernels(out).count("fused") + kernels(out).count("exp") == 1


@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.float16], ids=lambda d: d.name)
def test_half_weights_reach_the_matmul_without_a_cast(backend, monkeypatch, dtype):
    x = Tensor.randn(3, 16, seed=1)
    w = Tensor(np.random.default_rng(2).standard_normal((24, 16)), dtype=dtype)
    schedule, _ = graph.plan([nn.linear(x, w).node])
    assert "cast" not in [n.op for n in schedule.nodes]
    monkeypatch.setenv("TT_PASSES", "none")
    want = nn.linear(x, w).numpy()
    monkeypatch.setenv("TT_PASSES", "all")
    np.testing.assert_allclose(nn.linear(x, w).numpy(), want, rtol=1e-5, atol=1e-5)


def test_unknown_pass_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TT_PASSES", "fuse_everything")
    with pytest.raises(ValueError, match="unknown pass.*fuse_everything.*fuse_elementwise"):
        (Tensor.ones(2) + 1).realize()


def test_debug_prints_the_fused_kernels(backend, capsys, monkeypatch):
    monkeypatch.setenv("TT_DEBUG", "1")
    (Tensor.randn(4, seed=3).exp() * 2).realize()
    assert "fused" in capsys.readouterr().err
