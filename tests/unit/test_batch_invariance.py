"""A row's result does not depend on the rows computed with it (issue: exact, whatever the batch):
the llvm kernels that reduce (the float and block products, attention) give each row the same
bits alone, in a few-row batch, in a prefill's 16-row steps, and with the columns split into
whole steps and a tail. Compared with ==, not a tolerance: the promise is bit-identity. Every
level this CPU runs, each level against itself (the levels differ from each other: their
vectors hold 8 or 16 floats)."""
import numpy as np
import pytest

from backends.llvm import products
from ops import dtypes
from tests.levels import backend_params, use_backend
from tests.unit.test_blocks import FORMATS, product_bound, stored
from tinytensor import Tensor, nn

FLOATS = [dtypes.float32, dtypes.float16, dtypes.bfloat16]
# row groups a 37-row product is cut into: a prefill's 16- and 4-row steps, then a few rows
# (decode steps, a small batch), then again from odd starts
CUTS = [(0, 37), (0, 1), (1, 3), (3, 7), (7, 23), (23, 24), (24, 37), (5, 21)]


@pytest.fixture(params=[p for p in backend_params(levels=True) if "numpy" not in str(p)])
def llvm(request):
    """llvm at the default level and at each level this CPU runs (the NumPy reference is not
    in question: its products are BLAS's)."""
    yield from use_backend(request.param)


def rows_alone_and_together(x, weight):
    whole = nn.linear(Tensor(x), weight).numpy()
    return whole, [(a, b, nn.linear(Tensor(x[a:b]), weight).numpy()) for a, b in CUTS[1:]]


@pytest.mark.parametrize("dtype", list(FORMATS) + FLOATS, ids=lambda d: d.name)
@pytest.mark.parametrize("n", [45, 64])  # a column tail (45 = 2 x 16 + 13), and none
def test_a_products_rows_do_not_depend_on_the_rows_beside_them(llvm, dtype, n):
    rng = np.random.default_rng(n)
    k = 3 * (dtype.block.values if dtype.block else 40) + (0 if dtype.block else 7)  # float: a K % lanes tail
    x = rng.standard_normal((37, k)).astype(np.float32)
    if dtype.block:
        raw, _ = stored(rng, (n, k), dtype)
        weight = Tensor.from_numpy(raw, dtype)
    else:
        weight = Tensor(rng.standard_normal((n, k)).astype(np.float32)).cast(dtype).contiguous()
    whole, parts = rows_alone_and_together(x, weight)
    for a, b, got in parts:
        assert np.array_equal(got, whole[a:b]), f"rows {a}:{b}"


def test_a_swiglu_pairs_rows_do_not_depend_on_the_rows_beside_them(llvm):
    """Two weights in one kernel (the fused SwiGLU), each with its own sums per row."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 512)).astype(np.float32)
    gate, up = (Tensor.from_numpy(stored(rng, (40, 512), t)[0], t) for t in (dtypes.q4_k, dtypes.q4_k))

    def swiglu(rows):
        return (nn.linear(Tensor(rows), gate).silu() * nn.linear(Tensor(rows), up)).numpy()
    whole = swiglu(x)
    for a, b in CUTS[1:]:
        assert np.array_equal(swiglu(x[a:b]), whole[a:b]), f"rows {a}:{b}"


def test_attention_rows_do_not_depend_on_the_rows_or_keys_beside_them(llvm):
    """A query row's output is the same whether it comes alone (a decode step), among a
    prompt's rows in tiles of 4, or over a longer key buffer whose keys past it are masked (a
    preallocated cache): blocks of keys start at key 0 and a masked key adds nothing."""
    rng = np.random.default_rng(4)
    heads, kv_heads, seq, length, dim = 6, 2, 21, 40, 24  # 3 query heads per key; dim: a 16 + 8 tail
    q = rng.standard_normal((heads, seq, dim)).astype(np.float32)
    keys, values = (rng.standard_normal((kv_heads, length, dim)).astype(np.float32) for _ in range(2))

    def attend(rows, cache_length):
        visible = np.arange(cache_length)[None, :] <= rows[:, None]
        return nn.scaled_dot_product_attention(Tensor(q[:, rows]), Tensor(keys[:, :cache_length]),
                                               Tensor(values[:, :cache_length]), attn_mask=Tensor(visible)).numpy()
    whole = attend(np.arange(seq), seq)
    for rows, cache_length in [(np.arange(5, 9), length), (np.array([20]), length), (np.array([20]), 21),
                               (np.array([0]), 1), (np.arange(seq), length), (np.array([3, 17]), 33)]:
        assert np.array_equal(attend(rows, cache_length), whole[:, rows]), (rows, cache_length)


def test_a_long_attentions_rows_are_the_bits_of_each_row_alone(llvm):
    """The Vision encoder's attention (heads of 80, every position a query, a padding mask):
    tiles of 16 rows take the kernel with the rows in the lanes of vectors on x86 (one of
    AVX-512's 16 lanes, two of AVX2's 8: backends/llvm/attention.py); a row alone takes the
    streaming kernel. The same bits."""
    rng = np.random.default_rng(6)
    heads, seq, dim = 2, 45, 80  # 2 tiles of 16 and one of 13
    q, keys, values = (rng.standard_normal((heads, seq, dim)).astype(np.float32) for _ in range(3))
    pad = np.arange(seq) >= 40
    visible = ~(pad[:, None] & pad[None, :])
    whole = nn.scaled_dot_product_attention(Tensor(q), Tensor(keys), Tensor(values), attn_mask=Tensor(visible)).numpy()
    for row in (0, 17, 39, 44):
        alone = nn.scaled_dot_product_attention(Tensor(q[:, row:row + 1]), Tensor(keys), Tensor(values),
                                                attn_mask=Tensor(visible[row:row + 1])).numpy()
        assert np.array_equal(alone, whole[:, row:row + 1]), row


@pytest.mark.parametrize("transposed", [False, True], ids=["mask rows", "mask columns"])
def test_attention_never_reads_the_keys_no_row_may_see(llvm, transposed):
    """A decode step over a preallocated cache: the positions not yet written hold anything (NaN
    here), and whole blocks of them are skipped; the rows see the same bits as over the written
    keys alone. Rows of one tile (the query heads of a key head) see different prefixes, and the
    mask's keys lie side by side or (transposed) apart."""
    rng = np.random.default_rng(5)
    heads, kv_heads, length, dim = 8, 2, 150, 16
    seen = np.array([[40], [40], [3], [3], [99], [99], [17], [17]])  # the last key each query head sees
    q = rng.standard_normal((heads, 1, dim)).astype(np.float32)
    keys, values = (rng.standard_normal((kv_heads, length, dim)).astype(np.float32) for _ in range(2))
    unwritten = np.arange(length) > seen.reshape(kv_heads, -1).max(axis=1)[:, None]
    keys[unwritten], values[unwritten] = np.nan, np.nan
    visible = (np.arange(length)[None, :] <= seen).reshape(heads, 1, length)
    mask = Tensor(np.ascontiguousarray(visible.transpose(2, 1, 0))).permute(2, 1, 0) if transposed else Tensor(visible)
    got = nn.scaled_dot_product_attention(Tensor(q), Tensor(keys), Tensor(values), attn_mask=mask).numpy()
    assert np.isfinite(got).all()
    written = 100  # every key any row sees
    want = nn.scaled_dot_product_attention(Tensor(q), Tensor(keys[:, :written]), Tensor(values[:, :written]),
                                           attn_mask=Tensor(visible[..., :written])).numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", [dtypes.q4_0, dtypes.q4_k], ids=lambda d: d.name)
def test_the_faster_decode_trades_invariance_for_speed_not_accuracy(llvm, monkeypatch, dtype):
    """TT_BATCH_INVARIANT=0: a few rows take the one-row kernel, an order of its own, still
    within the product's rounding bound."""
    from ops import blocks
    monkeypatch.setenv("TT_BATCH_INVARIANT", "0")
    rng = np.random.default_rng(5)
    k = 2 * dtype.block.values
    raw, _ = stored(rng, (24, k), dtype)
    x = rng.standard_normal((2, k)).astype(np.float32)
    got = nn.linear(Tensor(x), Tensor.from_numpy(raw, dtype)).numpy()
    assert np.all(np.abs(got - blocks.product(x, raw, dtype.block)) <= product_bound(x, raw, dtype))


def test_a_wrong_batch_invariant_setting_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("TT_BATCH_INVARIANT", "yes")
    with pytest.raises(ValueError, match=r"^TT_BATCH_INVARIANT='yes': give 1 .* or 0 \(faster decode\)$"):
        products.batch_invariant()
