"""Block-quantised element types, as GGUF files store them (ggml's layouts), and their meaning.

A row of K values is K / 32 blocks of a fixed number of bytes; each block holds a float16 scale
d (some also a float16 minimum m) and 32 small integers q:

    q8_0  34 bytes: d, q int8[32]                         x = d * q
    q4_0  18 bytes: d, q 4-bit[32]                        x = d * (q - 8)
    q4_1  20 bytes: d, m, q 4-bit[32]                     x = d * q + m
    q5_0  22 bytes: d, high bits u32, q 4-bit[32]         x = d * (q - 16), q 5-bit
    q5_1  24 bytes: d, m, high bits u32, q 4-bit[32]      x = d * q + m, q 5-bit

4-bit values are packed two per byte: byte j holds value j in its low nibble and value j + 16
in its high nibble. The fifth bit of value j is bit j of the u32. `dequantize` is the one
meaning every backend computes; tests hold it to the `gguf` package's dequantisation.

A product x @ W.T with W in blocks multiplies 8-bit activations, as llama.cpp does: each block
of 32 values of a row of x is quantised to q8 (`quantize_rows`: d = max|x| / 127,
q = round-half-even(x * 127 / max|x|)), so each block's dot product is a sum of integer
products (exact) times d_w * d_x. `product` is that meaning; kernels differ from it only in
the order of the float32 sums.
"""
from dataclasses import dataclass

import numpy as np

BLOCK = 32


@dataclass(frozen=True)
class Format:
    name: str
    block_bytes: int
    ggml_type: int      # the type id in a GGUF file
    has_min: bool       # a float16 m after d: x = d * q + m
    high_bits: bool     # a u32 of fifth bits before the nibbles
    offset: int         # subtracted from q when there is no m
    nibbles: bool       # 4-bit values (else int8)

    @property
    def scale_bytes(self) -> int:  # the float16 fields
        return 4 if self.has_min else 2

    @property
    def quants_at(self) -> int:  # where the packed values start in a block
        return self.scale_bytes + (4 if self.high_bits else 0)


FORMATS = {f.name: f for f in (
    Format("q8_0", 34, 8, has_min=False, high_bits=False, offset=0, nibbles=False),
    Format("q4_0", 18, 2, has_min=False, high_bits=False, offset=8, nibbles=True),
    Format("q4_1", 20, 3, has_min=True, high_bits=False, offset=0, nibbles=True),
    Format("q5_0", 22, 6, has_min=False, high_bits=True, offset=16, nibbles=True),
    Format("q5_1", 24, 7, has_min=True, high_bits=True, offset=0, nibbles=True),
)}


def quants(blocks: np.ndarray, f: Format) -> np.ndarray:
    """The integers q [n, 32] of blocks [n, block_bytes] (before the offset)."""
    raw = blocks[:, f.quants_at:]
    if not f.nibbles:
        return raw.view(np.int8).astype(np.int32)
    q = np.concatenate([raw & 0x0F, raw >> 4], axis=1).astype(np.int32)
    if f.high_bits:
        bits = blocks[:, f.scale_bytes:f.scale_bytes + 4].copy().view("<u4")  # [n, 1]
        q |= (((bits >> np.arange(BLOCK, dtype=np.uint32)) & 1) << 4).astype(np.int32)
    return q


def scales(blocks: np.ndarray, f: Format) -> np.ndarray:
    """The float16 fields of blocks [n, block_bytes] as float32 [n, 1] (d) or [n, 2] (d, m)."""
    return blocks[:, :f.scale_bytes].copy().view("<f2").astype(np.float32)


def dequantize(x: np.ndarray, f: Format) -> np.ndarray:
    """Storage [..., K / 32 * block_bytes] (uint8) -> float32 values [..., K]."""
    lead, row_bytes = x.shape[:-1], x.shape[-1]
    blocks = np.ascontiguousarray(x).reshape(-1, f.block_bytes)
    halves = scales(blocks, f)
    q = quants(blocks, f)
    if f.has_min:
        values = halves[:, :1] * q.astype(np.float32) + halves[:, 1:2]
    else:
        values = halves[:, :1] * (q - f.offset).astype(np.float32)
    return values.reshape(*lead, row_bytes // f.block_bytes * BLOCK)


# ---- products: x @ W.T on 8-bit activations ------------------------------------------------------

def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 rows [m, K] -> their q8 blocks: (q int8 [m, K], d float32 [m, K / 32],
    s float32 [m, K / 32] = d * sum(q), which formats with a minimum use). Every step is one
    float32 operation, so a kernel doing the same steps gets the same bits."""
    m, k = x.shape
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(m, k // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=-1)
    d = amax / np.float32(127)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)
    q = np.rint(blocks * inverse[..., None]).astype(np.int8)
    s = d * q.sum(axis=-1, dtype=np.int32).astype(np.float32)
    return q.reshape(m, k), d, s


def product(x: np.ndarray, w: np.ndarray, f: Format) -> np.ndarray:
    """x [m, K] float32 @ W.T for W [n, K] stored in format f: x's q8 blocks (quantize_rows)
    times W's values, summed in float32."""
    q, d, _ = quantize_rows(x)
    a = (q.reshape(d.shape + (BLOCK,)).astype(np.float32) * d[..., None]).reshape(x.shape)
    return a @ dequantize(w, f).T
