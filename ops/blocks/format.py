"""What every block format says of itself: its size, its GGUF type id, how many values a block
holds, and the two directions of its meaning (`read`: bytes -> integers, scales, minimums;
`quantize`: float32 -> bytes). Each format's file (simple.py, k_quants.py, q6_k.py) names the
byte offsets of its fields once, as class attributes that the kernels' reads
(backends/llvm/blocks/) use too."""
from dataclasses import dataclass

import numpy as np

BLOCK = 32  # values per (sub-)block: the unit activations are quantised in


@dataclass(frozen=True)
class Format:
    name: str
    block_bytes: int
    ggml_type: int       # the type id in a GGUF file
    bits: int            # of each stored integer
    values: int = BLOCK  # per block: 32, or 256 for the K-quants' super-blocks
    offset: int = 0      # subtracted from every stored integer (q4_0: 8, q5_0: 16, q6_k: 32)

    @property
    def sub_blocks(self) -> int:
        return self.values // BLOCK

    @property
    def small(self) -> bool:
        """Whether every integer w has |w| <= 63, so that byte dot products on pairs of
        (unsigned byte) * w cannot saturate 16 bits (AVX2's)."""
        return self.bits < 8

    @property
    def unsigned(self) -> bool:
        """Whether every integer w is >= 0 (the formats with a minimum instead of an offset):
        then w can be the unsigned side of a byte dot product, the activations the signed one."""
        return self.offset == 0 and self.bits < 8

    def read(self, blocks: np.ndarray):
        """Blocks [n, block_bytes] -> per sub-block of 32 values (n * sub_blocks of them): the
        signed integers w [*, 32] (int32), the scale of each value [*, 32] and the minimum [*, 1]
        (float32; None for formats without one): x = scale * w (+ minimum)."""
        raise NotImplementedError

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float32 [n, K] -> its blocks [n, K / values * block_bytes] (uint8)."""
        raise NotImplementedError


def float16s(raw: np.ndarray) -> np.ndarray:
    """float16 fields [n, 2 * fields] (bytes) -> float32 [n, fields]."""
    return raw.copy().view("<f2").astype(np.float32)


def float16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [n] rounded to float16 -> their bytes [n, 2]."""
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)
