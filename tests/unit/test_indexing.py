"""Reading with [] (slices, ints, None, ..., integer tensors) and writing with []= and assign."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ops import dtypes
from tests.reference import FLOATS, INTS, shapes, tensors
from tinytensor import Tensor


@st.composite
def basic_index(draw, shape):
    items = []
    for n in shape:
        kind = draw(st.sampled_from(["slice", "int", "none"] if n else ["slice", "none"]))
        if kind == "int":
            items.append(draw(st.integers(-n, n - 1)))
        elif kind == "slice":
            bound = st.none() | st.integers(-n - 2, n + 2)
            items.append(slice(draw(bound), draw(bound), draw(st.none() | st.sampled_from([1, 2, 3, -1, -2]))))
        else:
            items.append(None)
            items.append(slice(None))
    if items and draw(st.booleans()):
        cut = draw(st.integers(0, len(items)))
        items = items[:cut] + [Ellipsis] + [i for i in items[cut:] if i is None]
    return tuple(items)


@given(x=tensors(FLOATS + INTS), data=st.data())
def test_getitem_basic_like_numpy(backend, x, data):
    index = data.draw(basic_index(x.shape))
    want = x.numpy()[index]
    got = x[index]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


@given(x=tensors(FLOATS + INTS, shapes(min_dims=1, min_side=1)), data=st.data())
def test_getitem_integer_tensor_gathers(backend, x, data):
    axis = data.draw(st.integers(0, x.ndim - 1))
    n = x.shape[axis]
    ids = np.array(data.draw(st.lists(st.integers(-n, n - 1), max_size=6)), dtype=np.int64)
    ids = ids.reshape(data.draw(st.sampled_from([(len(ids),), (1, len(ids))])))
    index = (slice(None),) * axis + (Tensor(ids),)
    np.testing.assert_array_equal(x[index].numpy(), x.numpy()[(slice(None),) * axis + (ids,)])


def test_index_out_of_range_names_the_shape():
    with pytest.raises(IndexError, match=r"\(2, 3\)"):
        Tensor.zeros(2, 3)[:, 3]


@given(x=tensors(FLOATS + INTS, shapes(min_dims=1)), data=st.data())
def test_setitem_writes_the_region(backend, x, data):
    index = tuple(i for i in data.draw(basic_index(x.shape)) if i is not None)
    want = x.numpy().copy()
    region = want[index]
    fill = data.draw(tensors([x.dtype], region.shape))
    want[index] = fill.numpy()
    x.realize()
    x[index] = fill
    np.testing.assert_array_equal(x.numpy(), want)


def test_setitem_broadcasts_numbers_and_rows(backend):
    x = Tensor.zeros(3, 4).contiguous().realize()
    x[1] = 7
    x[:, 0] = Tensor([1.0, 2.0, 3.0])
    x[2, 1:3] = Tensor([5.0])
    np.testing.assert_array_equal(x.numpy(), [[1, 0, 0, 0], [2, 7, 7, 7], [3, 5, 5, 0]])


def test_assign_writes_into_the_same_buffer(backend):
    cache = Tensor.zeros(4, 2).contiguous().realize()
    storage = cache.node.buffer
    for pos in range(4):
        cache[pos] = Tensor([float(pos), -float(pos)])
        cache.realize()
    assert cache.node.buffer is storage  # in place: a KV cache never reallocates
    np.testing.assert_array_equal(storage[:, 0], [0, 1, 2, 3])


def test_reads_recorded_before_a_write_see_the_old_value_within_one_realize(backend):
    cache = Tensor([1.0, 2.0, 3.0]).realize()
    before = cache * 10
    cache[0] = 100.0
    after = cache * 1
    before.realize(after)
    np.testing.assert_array_equal(before.numpy(), [10, 20, 30])
    np.testing.assert_array_equal(after.numpy(), [100, 2, 3])


def test_write_into_a_tensor_that_shares_storage_does_not_leak(backend):
    a, b = Tensor.zeros(3).realize(Tensor.zeros(3))[0], None
    k, v = Tensor.zeros(3), Tensor.zeros(3)
    k.realize(v)  # the same constant twice: computed once, but each must own its storage
    assert k.node.writable and v.node.writable and k.node.buffer is not v.node.buffer
    k[0] = 1.0
    k.realize()
    assert v.numpy().tolist() == [0.0, 0.0, 0.0]
    view = k.reshape(1, 3).realize()  # a view of k's buffer: writes must not reach k
    view[0, 1] = 5.0
    view.realize()
    assert k.numpy().tolist() == [1.0, 0.0, 0.0] and view.numpy().tolist() == [[1.0, 5.0, 0.0]]
    del a, b


def test_assign_whole_tensor_casts_value(backend):
    x = Tensor.zeros(2, dtype=dtypes.int32).realize()
    x.assign(Tensor([1.7, -2.2]))
    assert x.dtype == dtypes.int32 and x.tolist() == [1, -2]


def test_setitem_shape_mismatch_names_shapes():
    x = Tensor.zeros(3, 4)
    with pytest.raises(ValueError, match=r"\(2,\).*\(4,\)"):
        x[0] = Tensor([1.0, 2.0])


def test_a_write_realised_through_a_reader_is_not_redone(backend, monkeypatch):
    """A KV cache step: the write happens while computing something that reads it. The next
    step must read the written buffer, not recompute the write (and everything behind it)."""
    cache = Tensor.zeros(4).contiguous().realize()
    cache[0] = Tensor(1.0).exp()
    cache.sum().realize()
    assert cache.node.realized
    cache[1] = 2.0
    assert cache.sum().item() == np.float32(np.e) + 2
