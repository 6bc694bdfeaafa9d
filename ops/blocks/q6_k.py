"""q6_k (ggml's block_q6_K): 256 values of 6 bits, an int8 scale per 16 values, a float16 d:

    q6_k  210 bytes: ql 128 B @0, qh 64 B @128, scales int8[16] @192, d f16 @208

Sub-block s (of 32 values) is in half h = s // 4 of the super-block, t = s % 4 within it: the
low 4 bits of value l are nibble (t // 2) of ql[64h + 32(t % 2) + l], the high 2 bits are bits
2t, 2t+1 of qh[32h + l]; value = (d * sc) * (q - 32), sc = scales[8h + 2t + l // 16] (two
scales per sub-block).
"""
from dataclasses import dataclass

import numpy as np

from ops.blocks.format import Format, float16_bytes, float16s


@dataclass(frozen=True)
class Q6K(Format):
    QL, QH, SCALES, D = 0, 128, 192, 208

    def read(self, blocks):
        n = blocks.shape[0]
        ql, qh = blocks[:, self.QL:self.QL + 128].astype(np.int32), blocks[:, self.QH:self.QH + 64].astype(np.int32)
        w = np.empty((n, 8, 32), np.int32)
        for s in range(8):
            h, t = divmod(s, 4)
            low = ql[:, 64 * h + 32 * (t % 2):][:, :32] >> (4 * (t // 2)) & 15
            w[:, s] = (low | ((qh[:, 32 * h:32 * h + 32] >> (2 * t) & 3) << 4)) - self.offset
        d = float16s(blocks[:, self.D:self.D + 2])
        scale = d * blocks[:, self.SCALES:self.SCALES + 16].view(np.int8).astype(np.float32)  # [n, 16]
        return w.reshape(-1, 32), np.repeat(scale, 16, axis=1).reshape(-1, 32), None

    def quantize(self, x):
        """The largest magnitude of each 16 values becomes -32 (an int8 scale per 16, stepped by
        the super-block's d): llama.cpp's layout, without its search for the scale."""
        values = np.ascontiguousarray(x, np.float32).reshape(-1, 256)
        n = values.shape[0]
        out = np.zeros((n, self.block_bytes), np.uint8)
        sub = values.reshape(n, 16, 16)
        amax = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]  # signed
        scale = amax / -32
        big = np.take_along_axis(scale, np.abs(scale).argmax(-1)[:, None], -1)  # [n, 1], signed
        d = np.where(big != 0, big / -128, 0).astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(np.divide(scale, d, out=np.zeros_like(scale), where=d != 0)), -128, 127)
        step = np.repeat(d * sc, 16, axis=1).reshape(n, 256)
        q = (np.clip(np.rint(np.divide(values, step, out=np.zeros_like(values), where=step != 0)), -32, 31) + 32
             ).astype(np.uint8).reshape(n, 2, 4, 32)  # [half, t, l]
        # ql: half h's bytes 32 (t % 2) + l hold value t's low bits, value t + 2's in the high nibble
        out[:, self.QL:self.QL + 128] = np.concatenate(
            [(q[:, h, t] & 15) | ((q[:, h, t + 2] & 15) << 4) for h in (0, 1) for t in (0, 1)], axis=1)
        out[:, self.QH:self.QH + 64] = np.concatenate(
            [sum(((q[:, h, t] >> 4) << (2 * t)).astype(np.uint8) for t in range(4)) for h in (0, 1)], axis=1)
        out[:, self.SCALES:self.SCALES + 16] = sc.astype(np.int8).view(np.uint8)
        out[:, self.D:self.D + 2] = float16_bytes(d[:, 0])
        return out.reshape(x.shape[0], -1)
