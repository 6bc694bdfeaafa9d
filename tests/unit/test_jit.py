"""jit: a captured step replays with new inputs, gives what eager execution gives, and one
capture serves every position of a KV cache."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from models.formats.checkpoint import random_weights
from models.llama3 import KVCache, Llama
from models.llama3.config import LlamaConfig
from tinytensor import Tensor
from tinytensor.jit import jit


@given(data=st.data())
def test_assign_at_writes_at_a_runtime_position(backend, data):
    length, width = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 4))
    rows = data.draw(st.integers(1, length))
    start = data.draw(st.integers(0, length - rows))
    cache = Tensor.zeros(width, length).contiguous().realize()
    value = Tensor.randn(width, rows, seed=data.draw(st.integers(0, 99)))
    want = np.zeros((width, length), np.float32)
    want[:, start:start + rows] = value.numpy()
    cache.assign_at(Tensor([start]), value, axis=1)
    np.testing.assert_array_equal(cache.numpy(), want)


def test_replay_matches_eager_at_every_position(backend):
    cache = Tensor.zeros(2, 6).contiguous().realize()
    calls = []

    def step(x, pos):
        calls.append(1)
        cache.assign_at(pos, x, axis=1)
        visible = Tensor.arange(6).reshape(1, 6) <= pos.reshape(1, 1)
        return visible.where(cache, 0.0).sum(1) * x.reshape(2)

    replayed = jit(step)
    want = np.zeros((2, 6), np.float32)
    for pos in range(6):
        x = np.array([[pos + 1.0], [-pos - 0.5]], np.float32)
        want[:, pos] = x[:, 0]
        got = replayed(Tensor(x), Tensor([pos])).numpy()
        np.testing.assert_allclose(got, want[:, :pos + 1].sum(1) * x[:, 0], rtol=1e-6)
    assert len(calls) == 1  # recorded once, replayed five times


def test_a_write_that_cannot_be_in_place_is_refused(backend):
    lazy = Tensor.zeros(2, 3)  # not realised: a write would go to a fresh copy every time

    def step(x, pos):
        lazy.assign_at(pos, x, axis=1)
        return lazy.sum()
    with pytest.raises(ValueError, match="jit: .*does not own its buffer"):
        jit(step)(Tensor.ones(2, 1), Tensor([0]))


def test_model_decode_replay_equals_eager_forward(backend):
    config = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=64, max_context=64)
    model = Llama(config, random_weights(config, seed=1))
    tokens = [3, 7, 1, 9, 4, 4, 2]
    eager_cache, jit_cache = KVCache.allocate(config, 8), KVCache.allocate(config, 8)
    step = jit(lambda tok, pos: model.forward(tok, pos, jit_cache))
    for pos, token in enumerate(tokens):
        ids = Tensor(np.array([token]))
        want = model.forward(ids, pos, eager_cache).numpy()
        got = step(ids, Tensor([pos])).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_replay_gathers_at_indices_computed_in_the_step(backend, monkeypatch):
    """A gather whose indices the step itself computes (rows of a table at start + 0, 1, 2) runs
    only on replay: when a capture is prepared, the native steps before it have not run, so their
    buffers hold whatever memory held (filled with 0x7f bytes here, so reading them would fail)."""
    import backends.llvm.backend as llvm_backend

    class FreshMemory:  # numpy, with np.empty's memory made visibly not zero
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(shape, dtype=float):
            out = np.empty(shape, dtype)
            out.view(np.uint8).fill(0x7F)
            return out
    monkeypatch.setattr(llvm_backend, "np", FreshMemory())
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    step = jit(lambda start: Tensor(table)[start + Tensor.arange(3)] * 2.0)
    for start in (0, 5, 2, 7):
        np.testing.assert_array_equal(step(Tensor([start])).numpy(), table[start:start + 3] * 2.0)
