"""jit: a captured step replays with new inputs, gives what eager execution gives, and one
capture serves every position of a KV cache."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from models.formats.checkpoint import random_weights
from models.llama3 import KVCache, Llama
from models.llama3.config import LlamaConfig
from tests.levels import use_backend
from tinytensor import Tensor
from tinytensor.jit import jit


@pytest.fixture
def llvm():
    yield from use_backend("llvm")


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


@given(data=st.data())
def test_a_replayed_write_lands_at_each_position_it_is_given(backend, data):
    """assign_at in a captured step (a native copy on llvm, backends/llvm/writes.py), its value
    a transposed view as a KV cache's new keys are, at a position chosen on each replay."""
    heads, length, dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 5))
    rows = data.draw(st.integers(1, length))
    cache = Tensor.zeros(heads, length, dim).contiguous().realize()
    step = jit(lambda x, at: cache.assign_at(at, x.transpose(0, 1), axis=1).sum(0))
    want, rng = np.zeros((heads, length, dim), np.float32), np.random.default_rng(data.draw(st.integers(0, 99)))
    for _ in range(3):
        start = data.draw(st.integers(0, length - rows))
        x = rng.standard_normal((rows, heads, dim)).astype(np.float32)
        step(Tensor(x), Tensor([start]))
        want[:, start:start + rows] = x.transpose(1, 0, 2)
        np.testing.assert_array_equal(cache.numpy(), want)


def test_a_replayed_write_past_its_buffer_writes_nothing(llvm):
    """A native write cannot raise in the middle of a replay: a position whose rows would not
    fit writes nothing, rather than past the buffer."""
    cache = Tensor.zeros(2, 4, 3).contiguous().realize()
    step = jit(lambda x, at: cache.assign_at(at, x, axis=1).sum(0))
    step(Tensor.ones(2, 2, 3), Tensor([1]))
    for outside in (3, 4, 1 << 40, -1):
        step(Tensor.full((2, 2, 3), 7.0), Tensor([outside]))
    np.testing.assert_array_equal(cache.numpy()[:, [0, 3]], 0.0)
    np.testing.assert_array_equal(cache.numpy()[:, 1:3], 1.0)


@pytest.mark.parametrize("batch", [None, 3])
def test_a_captured_step_runs_its_layers_without_python_between_them(llvm, monkeypatch, batch):
    """The kernels of a decode step (alone, or a batch of sequences with their own caches: the
    cache writes and the attention rows' cat) run as native runs (backends/llvm/threads.py)
    whose number does not grow with the layers: no Python step cuts them between layers."""
    from backends.llvm import threads
    runs = []
    replay = threads.Run.__call__
    monkeypatch.setattr(threads.Run, "__call__", lambda self: (runs.append(self), replay(self))[1])
    counts = {}
    for layers in (2, 4):
        config = LlamaConfig(dim=32, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=64,
                             max_context=16)
        model = Llama(config, random_weights(config, seed=1))
        if batch is None:
            cache = KVCache.allocate(config, 8)
            step = jit(lambda tok, pos: model.forward(tok, pos, cache))
            args = (Tensor([3]), Tensor([2]))
        else:
            caches = [KVCache.allocate(config, 8) for _ in range(batch)]
            step = jit(lambda tok, pos, at: model.forward_batch(tok, pos, at, caches))
            args = (Tensor(np.arange(batch)), Tensor(np.arange(batch)), Tensor(np.arange(batch)))
        step(*args)  # the capture
        runs.clear()
        step(*args)
        counts[layers] = len(runs)
    assert counts[2] == counts[4] <= 2, counts


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
