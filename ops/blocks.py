"""Block-quantised element types, as GGUF files store them (ggml's layouts), and their meaning.

A row of K values is a run of blocks of a fixed number of bytes. The simple formats hold 32
values in a block: a float16 scale d (some also a float16 minimum m) and 32 small integers q:

    q8_0  34 bytes: d, q int8[32]                         x = d * q
    q4_0  18 bytes: d, q 4-bit[32]                        x = d * (q - 8)
    q4_1  20 bytes: d, m, q 4-bit[32]                     x = d * q + m
    q5_0  22 bytes: d, high bits u32, q 4-bit[32]         x = d * (q - 16), q 5-bit
    q5_1  24 bytes: d, m, high bits u32, q 4-bit[32]      x = d * q + m, q 5-bit

4-bit values are packed two per byte: byte j holds value j in its low nibble and value j + 16
in its high nibble. The fifth bit of value j is bit j of the u32.

The K-quants (what Q4_K_M and Q5_K_M files are made of) hold 256 values in a super-block of
eight sub-blocks of 32, each with its own scale and minimum, themselves small integers scaled by
the super-block's float16 d (and dmin); kquants.py reads their bytes:

    q4_k  144 bytes: d, dmin, 6-bit scales and minimums, q 4-bit[256]   x = d*sc * q - dmin*mn
    q5_k  176 bytes: the same with a fifth bit per value                 x = d*sc * q - dmin*mn, q 5-bit
    q6_k  210 bytes: q 6-bit[256], an int8 scale per 16 values, d        x = d*sc * (q - 32)

Every format comes down to the same thing per sub-block of 32 values (`sub_blocks`): signed
integers w, a float32 scale per value and, for the formats with one, a float32 minimum;
x = scale * w (+ minimum), one float32 multiply (and add), as ggml's own dequantisation computes
it. `dequantize` is the one meaning every backend computes; tests hold it to the `gguf`
package's dequantisation.

A product x @ W.T with W in blocks multiplies 8-bit activations, as llama.cpp does: each group
of a row of x is quantised to 8 bits with one scale (`quantize_rows`), so each sub-block's dot
product is a sum of integer products (exact) times scale_w * d_x. The group is the weight
format's block, as llama.cpp's `vec_dot_type` makes it: 32 values for the simple formats (its
q8_0: d = max|x| / 127, q = round-half-even(x * 127 / max|x|)), 256 for the K-quants (its q8_K:
the same over a super-block, d = 1 / (127 / max|x|)). `product` is that meaning; kernels differ
from it only in the order of the float32 sums.
"""
from dataclasses import dataclass

import numpy as np

from ops import kquants

BLOCK = 32  # values per (sub-)block: the unit activations are quantised in


@dataclass(frozen=True)
class Format:
    name: str
    block_bytes: int
    ggml_type: int      # the type id in a GGUF file
    bits: int           # of each stored integer
    has_min: bool       # a minimum added to every value of a (sub-)block
    high_bits: bool     # the fifth bits apart from the nibbles
    offset: int         # subtracted from q when there is no minimum
    values: int = BLOCK  # per block: 32, or 256 for the K-quants' super-blocks

    @property
    def sub_blocks(self) -> int:
        return self.values // BLOCK

    @property
    def scale_bytes(self) -> int:  # a simple format's float16 fields
        return 4 if self.has_min else 2

    @property
    def quants_at(self) -> int:  # where a simple format's packed values start in a block
        return self.scale_bytes + (4 if self.high_bits else 0)


FORMATS = {f.name: f for f in (
    Format("q8_0", 34, 8, bits=8, has_min=False, high_bits=False, offset=0),
    Format("q4_0", 18, 2, bits=4, has_min=False, high_bits=False, offset=8),
    Format("q4_1", 20, 3, bits=4, has_min=True, high_bits=False, offset=0),
    Format("q5_0", 22, 6, bits=5, has_min=False, high_bits=True, offset=16),
    Format("q5_1", 24, 7, bits=5, has_min=True, high_bits=True, offset=0),
    Format("q4_k", 144, 12, bits=4, has_min=True, high_bits=False, offset=0, values=256),
    Format("q5_k", 176, 13, bits=5, has_min=True, high_bits=True, offset=0, values=256),
    Format("q6_k", 210, 14, bits=6, has_min=False, high_bits=True, offset=32, values=256),
)}


def sub_blocks(blocks: np.ndarray, f: Format):
    """Blocks [n, block_bytes] -> per sub-block of 32 values (n * f.sub_blocks of them): the
    signed integers w [*, 32] (int32), the scale of each value [*, 32] and the minimum [*, 1]
    (float32; None for formats without one): x = scale * w (+ minimum)."""
    if f.values != BLOCK:
        return kquants.sub_blocks(blocks, f)
    d = blocks[:, :f.scale_bytes].copy().view("<f2").astype(np.float32)  # [n, 1] or [n, 2]: d, m
    raw = blocks[:, f.quants_at:]
    if f.bits == 8:
        q = raw.view(np.int8).astype(np.int32)
    else:
        q = np.concatenate([raw & 0x0F, raw >> 4], axis=1).astype(np.int32)
    if f.high_bits:
        bits = blocks[:, f.scale_bytes:f.scale_bytes + 4].copy().view("<u4")  # [n, 1]
        q |= (((bits >> np.arange(BLOCK, dtype=np.uint32)) & 1) << 4).astype(np.int32)
    return q - f.offset, np.broadcast_to(d[:, :1], q.shape), d[:, 1:2] if f.has_min else None


def dequantize(x: np.ndarray, f: Format) -> np.ndarray:
    """Storage [..., K / values * block_bytes] (uint8) -> float32 values [..., K]."""
    lead, row_bytes = x.shape[:-1], x.shape[-1]
    w, scale, minimum = sub_blocks(np.ascontiguousarray(x).reshape(-1, f.block_bytes), f)
    values = scale * w.astype(np.float32)
    if minimum is not None:
        values += minimum
    return values.reshape(*lead, row_bytes // f.block_bytes * f.values)


def quantize(x: np.ndarray, f: Format) -> np.ndarray:
    """float32 [n, K] -> its blocks in format f: the `gguf` package's quantisation (llama.cpp's
    reference one) for the simple formats, kquants.quantize for the K-quants."""
    if f.values != BLOCK:
        return kquants.quantize(x, f)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize
    return gguf_quantize(np.ascontiguousarray(x, np.float32), GGMLQuantizationType(f.ggml_type))


# ---- products: x @ W.T on 8-bit activations ------------------------------------------------------

def quantize_rows(x: np.ndarray, group: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 rows [m, K] -> their 8-bit values, one scale per `group` values (32, or 256 for
    the K-quants), given per block of 32: (q int8 [m, K], d float32 [m, K / 32], s float32
    [m, K / 32] = d * sum(q) over the block, which formats with a minimum use). Every step is one
    float32 operation, so a kernel doing the same steps gets the same bits."""
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
    return q.reshape(m, k), d, s


def product(x: np.ndarray, w: np.ndarray, f: Format) -> np.ndarray:
    """x [m, K] float32 @ W.T for W [n, K] stored in format f: x's 8-bit values, one scale per
    block of f (quantize_rows), times W's values, summed in float32."""
    q, d, _ = quantize_rows(x, f.values)
    a = (q.reshape(d.shape + (BLOCK,)).astype(np.float32) * d[..., None]).reshape(x.shape)
    return a @ dequantize(w, f).T
