"""The simple formats: 32 values a block, a float16 scale d (some also a float16 minimum m) and
32 small integers q:

    q8_0  34 bytes: d, q int8[32]                         x = d * q
    q4_0  18 bytes: d, q 4-bit[32]                        x = d * (q - 8)
    q4_1  20 bytes: d, m, q 4-bit[32]                     x = d * q + m
    q5_0  22 bytes: d, high bits u32, q 4-bit[32]         x = d * (q - 16), q 5-bit
    q5_1  24 bytes: d, m, high bits u32, q 4-bit[32]      x = d * q + m, q 5-bit

4-bit values are packed two per byte: byte j holds value j in its low nibble and value j + 16
in its high nibble. The fifth bit of value j is bit j of the u32. Offsets in bytes: d @0, m @2,
then the u32 (`high_at`), then the integers (`quants_at`).
"""
from dataclasses import dataclass

import numpy as np

from ops.blocks.format import BLOCK, Format, float16s


@dataclass(frozen=True)
class Simple(Format):
    has_min: bool = False    # a minimum added to every value of the block
    high_bits: bool = False  # the fifth bits apart from the nibbles

    D, M = 0, 2  # the float16 scale and minimum

    @property
    def high_at(self) -> int:  # the u32 of fifth bits
        return 4 if self.has_min else 2

    @property
    def quants_at(self) -> int:  # the packed integers
        return self.high_at + (4 if self.high_bits else 0)

    def read(self, blocks):
        d = float16s(blocks[:, :self.high_at])  # [n, 1] or [n, 2]: d, m
        raw = blocks[:, self.quants_at:]
        if self.bits == 8:
            q = raw.view(np.int8).astype(np.int32)
        else:
            q = np.concatenate([raw & 0x0F, raw >> 4], axis=1).astype(np.int32)
        if self.high_bits:
            bits = blocks[:, self.high_at:self.high_at + 4].copy().view("<u4")  # [n, 1]
            q |= (((bits >> np.arange(BLOCK, dtype=np.uint32)) & 1) << 4).astype(np.int32)
        return q - self.offset, np.broadcast_to(d[:, :1], q.shape), d[:, 1:2] if self.has_min else None

    def quantize(self, x):
        """The `gguf` package's quantisation (llama.cpp's reference one)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize as gguf_quantize
        return gguf_quantize(np.ascontiguousarray(x, np.float32), GGMLQuantizationType(self.ggml_type))
