"""Block-quantised weights (ops/blocks/): each format's meaning against the `gguf` package
(llama.cpp's own Python reference), and the products that read them as stored, with every
fusion, on both backends, against float32 arithmetic on the dequantised weights."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from ops import blocks, dtypes
from tinytensor import Tensor, nn

FORMATS = dtypes.BLOCKS
EPS = np.finfo(np.float32).eps


SIMPLE = [d for d in FORMATS if d.block.values == 32]
K_QUANTS = [d for d in FORMATS if d.block.values == 256]


def stored(rng, shape, dtype, spread=1.0):
    """(the bytes of a random matrix quantised to dtype, the values they mean). The gguf package
    cannot quantise to K-quants: their super-blocks are random bytes, every bit pattern of the
    integers, scales and minimums, with random float16 d and dmin of the given spread."""
    kind = GGMLQuantizationType(dtype.block.ggml_type)
    if dtype.block.values == 32:
        raw = quantize((rng.standard_normal(shape) * spread).astype(np.float32), kind)
    else:
        f = dtype.block
        raw = rng.integers(0, 256, dtype.storage_shape(shape), dtype=np.uint8)
        halves = raw.reshape(-1, f.block_bytes)[:, slice(208, 210) if f.name == "q6_k" else slice(0, 4)]
        halves[:] = (rng.standard_normal(halves.shape[:1] + (halves.shape[1] // 2,)) * spread / 512
                     ).astype(np.float16).view(np.uint8)
    return raw, dequantize(raw, kind).astype(np.float32)


def bound(x, w):
    """How far two float32 summation orders of x @ w.T may differ: K units of rounding on the
    sum of the absolute products (the textbook bound for a reordered dot product), plus one
    rounding of the result."""
    return (x.shape[-1] + 1) * EPS * (np.abs(x) @ np.abs(w).T) + 1e-30


def magnitudes(raw, dtype):
    """Per weight, the size of the terms a kernel adds for it: |scale w| + |minimum| (the
    integer sums are exact; a value's minimum is added apart from it, so they may cancel), or
    with the offset apart too (column_lanes: |scale (w + offset)| + |scale offset| + |minimum|)."""
    w, scale, minimum = dtype.block.read(raw.reshape(-1, dtype.block.block_bytes))
    offset = dtype.block.offset
    size = np.abs(scale.astype(np.float64)) * (np.abs(w + offset) + offset)
    if minimum is not None:
        size += np.abs(minimum.astype(np.float64))
    return size.reshape(raw.shape[0], -1)


def q8(x, group=32):
    """x's 8-bit values, one scale per `group` (ops.blocks.quantize_rows, dequantised), in float64."""
    q, d, _ = blocks.quantize_rows(x.astype(np.float32), group)
    return q.reshape(d.shape + (32,)).astype(np.float64) * d[..., None].astype(np.float64)


def q8_product(x, raw, dtype):
    """ops.blocks.product in float64: x's 8-bit values times W's scaled integers, and each
    sub-block's minimum times x's block sum s as stored."""
    f = dtype.block
    q, d, s = blocks.quantize_rows(x.astype(np.float32), f.values)
    a = (q.reshape(d.shape + (32,)).astype(np.float64) * d[..., None]).reshape(x.shape)
    ints, scale, minimum = f.read(raw.reshape(-1, f.block_bytes))
    out = a @ (scale.astype(np.float64) * ints).reshape(raw.shape[0], -1).T
    if minimum is not None:
        out += s.astype(np.float64) @ minimum.astype(np.float64).reshape(raw.shape[0], -1).T
    return out


def product_bound(x, raw, dtype):
    """How far a kernel's x @ W.T on blocks may be from ops.blocks.product: both sum the same
    products of x's q8 values with W's (exact reals) and minimums with x's block sums s in
    float32, the reference in K + 2 roundings of its terms, a kernel in K + 4 of them (see
    magnitudes; |s| is within float16's 2^-10 of the sum of |x|'s 8-bit values)."""
    a = np.abs(q8(x, dtype.block.values)).reshape(x.shape)
    return (2 * x.shape[-1] + 6) * EPS * (1 + 2.0 ** -10) * (a @ magnitudes(raw, dtype).T) + 1e-30


def q8_reach(x, e, w_abs, group=32):
    """How far x's 8-bit product with |w| may move when the kernel only has x to within e
    (elementwise): each q may step by one where x * 127 / amax lies within reach of a
    half-integer (rounding goes the other way), the scale amax / 127 moves with amax, and per
    32 values (stored as float16, with s) the scale and s may round to a neighbouring float16,
    2^-10 of them, where amax moves at all."""
    m, k = x.shape
    xb, eb = np.abs(x).reshape(m, k // group, group), e.reshape(m, k // group, group)
    amax, moved = xb.max(-1, keepdims=True), eb.max(-1, keepdims=True)
    safe = np.where(amax > 0, amax, 1)
    scaled = xb * 127 / safe
    reach = 127 * (eb / safe + xb * moved / safe ** 2) + 4 * EPS * 128  # + the float32 inverse and product
    may_step = np.abs(scaled - np.floor(scaled) - 0.5) <= reach
    step = (amax + moved) / 127
    per_value = may_step * step + moved / 127 * (scaled + 1)
    if group == 32:
        per_value = per_value + (moved > 0) * step * 2.0 ** -10 * (scaled + 1)
    return np.where(amax > 0, per_value, eb).reshape(m, k) @ w_abs.T


@pytest.mark.parametrize("dtype", FORMATS, ids=lambda d: d.name)
def test_meaning_is_ggufs_dequantisation(dtype):
    rng = np.random.default_rng(1)
    for spread in (1.0, 1e-3, 300.0):  # small and large scales, and for q5 every fifth bit
        raw, want = stored(rng, (7, 256), dtype, spread)
        got = dtypes.widen(raw, dtype)
        assert got.dtype == np.float32 and np.array_equal(got, want)
    t = Tensor.from_numpy(raw, dtype)
    assert t.shape == (7, 256) and np.array_equal(t.numpy(), want)


@pytest.mark.parametrize("dtype, simple", [(dtypes.q4_k, dtypes.q4_1), (dtypes.q5_k, dtypes.q5_1),
                                           (dtypes.q6_k, dtypes.q5_1)], ids=lambda d: d.name)
def test_k_quants_we_write_are_ggmls_layout(dtype, simple):
    """KQuant.quantize and Q6K.quantize: the gguf package reads our super-blocks as we do (llama.cpp's
    layout), zero rows stay zero, and the rounding error is no worse than that of the simple
    format with as many bits (or fewer) from llama.cpp's own quantisation, on Gaussian rows."""
    x = np.random.default_rng(4).standard_normal((16, 512)).astype(np.float32)
    x[3], x[4, :256] = 0, np.abs(x[4, :256])  # an empty row; a super-block with no negative value
    raw = dtype.block.quantize(x)
    assert raw.shape == dtype.storage_shape(x.shape)
    got = dtypes.widen(raw, dtype)
    assert np.array_equal(got, dequantize(raw, GGMLQuantizationType(dtype.block.ggml_type)))
    assert not got[3].any()
    theirs = dtypes.widen(simple.block.quantize(x), simple)
    assert np.sqrt(np.mean((got - x) ** 2)) <= np.sqrt(np.mean((theirs - x) ** 2)) * 1.01


@pytest.mark.parametrize("group", [32, 256])
def test_activations_meet_blocks_in_eight_bits(group):
    """ops.blocks.quantize_rows, one scale per group (32 for the simple formats, 256 for the
    K-quants, as llama.cpp's q8_0 and q8_K): each group's largest magnitude becomes 127, every
    value moves by at most half a step d = amax / 127 (plus 127 times the scale's rounding to
    float16 per 32 values, as ggml stores it: 2^-11 relative, or half of float16's subnormal
    spacing 2^-24), an all-zero group stays zero, and each block of 32 has its group's d and
    s = d * sum(q) (its float16 per 32)."""
    blocks_per_group = group // 32
    x = np.random.default_rng(2).standard_normal((3, 3 * group)).astype(np.float32) * np.float32([[1], [1e-3], [300]])
    x[1, group:2 * group] = 0
    q, d, s = blocks.quantize_rows(x, group)
    assert q.dtype == np.int8 and d.shape == s.shape == (3, 3 * blocks_per_group)
    assert np.array_equal(d, np.repeat(d[:, ::blocks_per_group], blocks_per_group, axis=1))
    qg, xg = q.reshape(3, 3, group).astype(np.float64), x.reshape(3, 3, group).astype(np.float64)
    dg = d[:, ::blocks_per_group].astype(np.float64)
    assert np.array_equal(np.abs(qg).max(-1), np.where(dg > 0, 127, 0))
    half = 2.0 ** -11 if group == 32 else 0.0  # float16's unit roundoff where the scale is stored so
    rounded = np.maximum(half * dg, 2.0 ** -25 if half else 0.0)[..., None]
    assert np.all(np.abs(qg * dg[..., None] - xg) <= (dg[..., None] / 2 + 127 * rounded) * (1 + 4 * EPS))
    assert np.array_equal(dg[1, 1], 0) and not qg[1, 1].any()
    # s: the unrounded scale times the sum, rounded once to float16 (per 32)
    sums, scale_rounding = q.reshape(3, -1, 32).sum(-1), np.repeat(rounded[..., 0], group // 32, axis=-1)
    assert np.all(np.abs(s - d * sums) <= np.abs(sums) * scale_rounding + np.abs(d * sums) * (half + 2 * EPS) +
                  (2.0 ** -25 if half else 0))


@pytest.mark.parametrize("group", [32, 256])
def test_the_kernel_quantises_activations_to_the_same_bits(group):
    """The llvm backend's row quantiser does ops.blocks.quantize_rows's float32 steps in the same
    order: the same bytes (stored + 128), scales and sums, bit for bit."""
    from backends.llvm.plan import Plan
    from backends.llvm.products import _quantize_rows
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((5, 4 * group)) * rng.uniform(1e-3, 1e3, (5, 1))).astype(np.float32)
    x[2, :group] = 0
    plan = Plan(fixed=False)
    rows = _quantize_rows(plan, x, group)
    plan.run()
    q, d, s = blocks.quantize_rows(x, group)
    assert np.array_equal((rows.q.view(np.uint8) ^ 0x80).view(np.int8), q)
    assert np.array_equal(rows.d, d) and np.array_equal(rows.s, s)


@pytest.mark.parametrize("dtype", FORMATS, ids=lambda d: d.name)
@pytest.mark.parametrize("m, n, k", [(1, 37, 32), (1, 8, 96), (3, 13, 64), (5, 6, 160), (9, 17, 32), (6, 16, 64),
                                     (12, 27, 96), (17, 33, 64)])
def test_product_reads_blocks_as_stored(backend, dtype, m, n, k):
    """x @ W.T for decode (one row) and prefill shapes, with row and column tails (rows of 32 to
    160 values, 256 to 1280 for the K-quants; 16 or 8 columns at a time for the column-lane
    kernels, with 12 or 4 rows, then single rows)."""
    rng = np.random.default_rng(m * 1000 + n + k)
    k = k * dtype.block.values // 32
    raw, w = stored(rng, (n, k), dtype)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = nn.linear(Tensor(x), Tensor.from_numpy(raw, dtype)).numpy()
    assert got.shape == (m, n)
    assert np.all(np.abs(got - blocks.product(x, raw, dtype.block)) <= product_bound(x, raw, dtype))


MIXES = {  # (dim, ffn, [q, k, v], gate, up, down)
    "simple": (64, 96, [dtypes.q4_0, dtypes.q8_0, dtypes.q5_1], dtypes.q4_1, dtypes.q4_1, dtypes.q5_0),
    # Q4_K_M-style: q6_k for v and down; K-quants beside simple formats in one fused op (Q, K
    # and V), and a SwiGLU pair whose weights read x in 8 bits per 256 and per 32 (two kernels)
    "k": (256, 512, [dtypes.q4_k, dtypes.q8_0, dtypes.q6_k], dtypes.q4_k, dtypes.q5_0, dtypes.q6_k),
    "k5": (256, 256, [dtypes.q5_k, dtypes.q5_k, dtypes.q6_k], dtypes.q5_k, dtypes.q5_k, dtypes.q6_k),
}


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("m", [1, 6, 12])
def test_every_fusion_reads_blocks(backend, m, mix):
    """The model's fusions on quantised weights, formats mixed as Q4_K_M-style files mix them:
    RMSNorm prologue with Q, K and V side by side, SwiGLU over two weights, residual epilogue."""
    rng = np.random.default_rng(m)
    dim, ffn, qkv_types, gate_type, up_type, down_type = MIXES[mix]
    eps = 1e-5
    x = rng.standard_normal((m, dim)).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    (wq, _), (wk, _), (wv, _) = (stored(rng, (n, dim), d) for n, d in zip((64, 32, 32), qkv_types))
    (wg, _), (wu, _) = stored(rng, (ffn, dim), gate_type), stored(rng, (ffn, dim), up_type)
    wd, _ = stored(rng, (dim, ffn), down_type)
    T = Tensor.from_numpy
    h = nn.rms_norm(Tensor(x), Tensor(g), eps)
    qkv = [nn.linear(h, T(raw, d)) for raw, d in zip((wq, wk, wv), qkv_types)]
    hidden = nn.linear(h, T(wg, gate_type)).silu() * nn.linear(h, T(wu, up_type))
    out = Tensor(x) + nn.linear(hidden, T(wd, down_type))
    out.realize(*qkv)  # one graph, so the fusions see every reader

    # exact (float64) values, and how far the kernels' float32 may carry each from them: the
    # norm's sum of squares (dim roundings, halved by the square root, then 4 more), each
    # product's summation bound and the q8 steps its input's error can cause (q8_reach),
    # silu (|silu'| <= 1.1, and 4 roundings) times up, and the last product and residual add
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    normed = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * g64
    d_normed = (dim / 2 + 5) * EPS * np.abs(normed)

    def want(a, d_a, raw, dtype):  # (a's q8 product with W, how far a kernel may be from it)
        return q8_product(a, raw, dtype), product_bound(a, raw, dtype) + \
            q8_reach(a, d_a, magnitudes(raw, dtype), dtype.block.values)

    for product, raw, dtype in zip(qkv, (wq, wk, wv), qkv_types):
        value, reach = want(normed, d_normed, raw, dtype)
        assert np.all(np.abs(product.numpy() - value) <= reach)
    (a, d_a), (b, d_b) = (want(normed, d_normed, raw, d) for raw, d in ((wg, gate_type), (wu, up_type)))
    silu = a / (1 + np.exp(-a))
    h64 = silu * b
    d_h = 1.1 * np.abs(b) * d_a + np.abs(silu) * d_b + 4 * EPS * np.abs(h64)
    value, reach = want(h64, d_h, wd, down_type)
    assert np.all(np.abs(out.numpy() - (x64 + value)) <= reach + EPS * np.abs(x64 + value))


@pytest.mark.parametrize("dtype", [dtypes.q8_0, dtypes.q4_1, dtypes.q6_k], ids=lambda d: d.name)
def test_embedding_reads_only_its_rows(backend, dtype):
    rng = np.random.default_rng(3)
    raw, w = stored(rng, (50, 256), dtype)
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
    a, b = q8(x64).reshape(x.shape) @ gate.T, x64 @ up64.T  # the block product meets x in 8 bits
    silu = a / (1 + np.exp(-a))
    reach = 1.1 * np.abs(b) * product_bound(x, raw, dtypes.q4_0) + np.abs(silu) * bound(x64, up64) \
        + 4 * EPS * np.abs(silu * b)
    assert np.all(np.abs(got - silu * b) <= reach)


@pytest.mark.parametrize("kind", ["vnni", "vnni-256", "avx2", "sdot", "generic"])
@pytest.mark.parametrize("dtype", [dtypes.q8_0, dtypes.q4_0, dtypes.q4_1, dtypes.q5_1, dtypes.q4_k, dtypes.q5_k,
                                   dtypes.q6_k], ids=lambda d: d.name)
def test_every_dot_product_the_kernels_can_use(monkeypatch, kind, dtype):
    """Each target's byte dot product (backends/llvm/blocks/dot.py), run here where this CPU has its
    instructions: the same products within the same bound, the column-lane kernels with 16
    lanes (AVX-512 VNNI) or 8 (AVX-VNNI's 256-bit form, AVX2, aarch64's sdot, generic) and their
    column tails."""
    import backends
    from backends.llvm import column_lanes, plan as kernel_plan
    from backends.llvm.blocks import dot as llvm_blocks
    from backends.llvm.target import host
    # each CPU that has one has those before it
    kinds = {"x86_64": ["generic", "avx2", "vnni"], "aarch64": ["generic", "sdot"]}.get(host().arch, ["generic"])
    if kind.split("-")[0] not in kinds or kinds.index(kind.split("-")[0]) > kinds.index(llvm_blocks._kind(host())):
        pytest.skip(f"this CPU has no {kind} instructions")
    monkeypatch.setattr(llvm_blocks, "_kind", lambda target: kind.split("-")[0])
    if kind == "vnni-256":
        monkeypatch.setattr(column_lanes, "wide_lanes", lambda target=None: False)
    monkeypatch.setattr(kernel_plan, "_kernels", {})  # compile anew with this kind
    backends.use("llvm")
    try:
        rng = np.random.default_rng(11)
        k = 3 * dtype.block.values
        raw, _ = stored(rng, (21, k), dtype)
        x = rng.standard_normal((5, k)).astype(np.float32)
        got = nn.linear(Tensor(x), Tensor.from_numpy(raw, dtype)).numpy()
    finally:
        backends.use(None)
    assert np.all(np.abs(got - blocks.product(x, raw, dtype.block)) <= product_bound(x, raw, dtype))


@pytest.mark.parametrize("kind", ["IQ4_NL", "Q3_K"])
def test_types_without_kernels_load_as_bfloat16_with_a_note(tmp_path, capsys, kind):
    """A GGUF tensor of a type with no kernels here (IQ*, Q2_K, Q3_K) is dequantised at load, by
    the gguf package, to bfloat16 (half of float32's memory), and the loader says so."""
    import gguf
    from tinytensor.state import gguf_file
    kind = GGMLQuantizationType[kind]
    values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    raw = np.random.default_rng(5).integers(0, 256, (6, 512 // values * block_bytes), dtype=np.uint8)
    d_at = 0 if kind == GGMLQuantizationType.IQ4_NL else block_bytes - 2  # where the float16 d is
    raw.reshape(-1, block_bytes)[:, d_at:d_at + 2] = np.array([0.01], np.float16).view(np.uint8)
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tensor("x", raw, raw_dtype=kind)  # a byte shape: it works out the values
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    _, tensors = gguf_file.read(tmp_path / "m.gguf")
    got, dtype = tensors["x"]
    assert dtype == dtypes.bfloat16 and got.shape == (6, 512)
    want = dtypes.narrow(dequantize(raw, kind).astype(np.float32), dtypes.bfloat16)
    assert np.array_equal(got, want)
    assert f"1 {kind.name} tensors have no native kernels here; they were dequantised to bfloat16" \
        in capsys.readouterr().err


def test_each_block_dtype_is_the_format_of_its_name():
    """The module names are looked up by name: reordering ops.blocks.FORMATS renames nothing."""
    for d in dtypes.BLOCKS:
        assert getattr(dtypes, d.name) is d and d.block.name == d.name
