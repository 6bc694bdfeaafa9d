"""Block-quantised element types, as GGUF files store them (ggml's layouts), and their meaning.

A row of K values is a run of blocks of a fixed number of bytes. Each format is one object
(ops/blocks/format.py) that owns its byte layout (the offsets of its fields, named once), its
meaning and its quantiser; the kernels read it through its counterpart in
backends/llvm/blocks/, and never test a format's name:

    simple.py     q8_0, q4_0, q4_1, q5_0, q5_1: 32 values, a float16 scale (and minimum)
    k_quants.py   q4_k, q5_k: 256 values in eight sub-blocks with 6-bit scales and minimums
    q6_k.py       q6_k: 256 values of 6 bits, an 8-bit scale per 16

Every format comes down to the same thing per sub-block of 32 values (`Format.read`): signed
integers w, a float32 scale per value and, for the formats with one, a float32 minimum;
x = scale * w (+ minimum), one float32 multiply (and add), as ggml's own dequantisation computes
it. `dequantize` is the one meaning every backend computes; tests hold it to the `gguf`
package's dequantisation.

A product x @ W.T with W in blocks multiplies 8-bit activations, as llama.cpp does: each group
of a row of x is quantised to 8 bits with one scale (`quantize_rows`), so each sub-block's dot
product is a sum of integer products (exact) times scale_w * d_x. The group is the weight
format's block, as llama.cpp's `vec_dot_type` makes it: 32 values for the simple formats (its
q8_0 and q8_1: d = max|x| / 127 stored as float16, q = round-half-even(x * 127 / max|x|), and
q8_1's block sum s as float16, as its x86 builds compute them), 256 for the K-quants (its q8_K:
the same over a super-block, d = 1 / (127 / max|x|) in float32). `product` is that meaning;
kernels differ from it only in the order of the float32 sums.

Adding a format: a file here with its class (or a row of an existing class), a row in FORMATS,
its name in ops/dtypes.py, and its reads in backends/llvm/blocks/ (see docs/architecture.md).
"""
import numpy as np

from ops.blocks.format import BLOCK, Format
from ops.blocks.k_quants import KQuant
from ops.blocks.q6_k import Q6K
from ops.blocks.simple import Simple

FORMATS = {f.name: f for f in (
    Simple("q8_0", 34, 8, bits=8),
    Simple("q4_0", 18, 2, bits=4, offset=8),
    Simple("q4_1", 20, 3, bits=4, has_min=True),
    Simple("q5_0", 22, 6, bits=5, offset=16, high_bits=True),
    Simple("q5_1", 24, 7, bits=5, has_min=True, high_bits=True),
    KQuant("q4_k", 144, 12, bits=4, values=256),
    KQuant("q5_k", 176, 13, bits=5, values=256, high_bits=True),
    Q6K("q6_k", 210, 14, bits=6, values=256, offset=32),
)}


def dequantize(x: np.ndarray, f: Format) -> np.ndarray:
    """Storage [..., K / values * block_bytes] (uint8) -> float32 values [..., K]."""
    lead, row_bytes = x.shape[:-1], x.shape[-1]
    w, scale, minimum = f.read(np.ascontiguousarray(x).reshape(-1, f.block_bytes))
    values = scale * w.astype(np.float32)
    if minimum is not None:
        values += minimum
    return values.reshape(*lead, row_bytes // f.block_bytes * f.values)


# ---- products: x @ W.T on 8-bit activations ------------------------------------------------------

def quantize_rows(x: np.ndarray, group: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 rows [m, K] -> their 8-bit values, one scale per `group` values (32, or 256 for
    the K-quants), given per block of 32: (q int8 [m, K], d float32 [m, K / 32], s float32
    [m, K / 32] ~ d * sum(q) over the block, which formats with a minimum use). Every step is one
    float32 operation, so a kernel doing the same steps gets the same bits.

    As llama.cpp's x86 builds quantise activations: q = x * (127 / amax) rounded half to even;
    per 32 values (its q8_0 and q8_1) the scale amax / 127 is stored as float16 and s as the
    float16 of the unrounded scale times sum(q); per 256 (q8_K) both stay float32."""
    m, k = x.shape
    groups = np.ascontiguousarray(x, dtype=np.float32).reshape(m, k // group, group)
    amax = np.abs(groups).max(axis=-1)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)
    if group == BLOCK:
        d = amax / np.float32(127)
    else:  # llama.cpp's q8_K keeps the inverse's inverse
        d = np.divide(np.float32(1), inverse, out=np.zeros_like(amax), where=amax != 0)
    q = np.rint(groups * inverse[..., None]).astype(np.int8).reshape(m, k // BLOCK, BLOCK)
    d = np.repeat(d, group // BLOCK, axis=-1)
    s = d * q.sum(axis=-1, dtype=np.int32).astype(np.float32)
    if group == BLOCK:
        with np.errstate(over="ignore"):  # as ggml's: a sum past float16's range is infinite
            d, s = (v.astype(np.float16).astype(np.float32) for v in (d, s))
    return q.reshape(m, k), d, s


def product(x: np.ndarray, w: np.ndarray, f: Format) -> np.ndarray:
    """x [m, K] float32 @ W.T for W [n, K] stored in format f: x's 8-bit values, one scale per
    block of f (quantize_rows), times W's values, summed in float32; a weight sub-block's
    minimum m meets the sum s of x's block as quantize_rows stores it, as ggml's products do:
    sum_k a_k (scale w_k + m) = sum_k a_k scale w_k + m s."""
    q, d, s = quantize_rows(x, f.values)
    a = (q.reshape(d.shape + (BLOCK,)).astype(np.float32) * d[..., None]).reshape(x.shape)
    n = w.shape[0]
    ints, scale, minimum = f.read(np.ascontiguousarray(w).reshape(-1, f.block_bytes))
    out = a @ (scale * ints.astype(np.float32)).reshape(n, -1).T
    if minimum is not None:
        out += s @ minimum.reshape(n, -1).T
    return out
