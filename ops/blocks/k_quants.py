"""q4_k and q5_k (ggml's block_q4_K, block_q5_K; what Q4_K_M and Q5_K_M files are mostly made
of): 256 values in a super-block of eight sub-blocks of 32, each with its own 6-bit scale and
minimum, themselves scaled by the super-block's float16 d and dmin:

    q4_k  144 bytes: d f16 @0, dmin f16 @2, scales 12 B @4, qs 128 B @16
    q5_k  176 bytes: d f16 @0, dmin f16 @2, scales 12 B @4, qh 32 B @16, qs 128 B @48

Sub-block s has a 6-bit scale sc and minimum mn packed in the 12 bytes (`scale_min`), value =
(d * sc) * q - (dmin * mn); its 32 values are the low (s even) or high (s odd) nibbles of
qs[32 * (s // 2):][:32], and for q5_k bit s of qh[l] is value l's fifth bit.
"""
from dataclasses import dataclass

import numpy as np

from ops.blocks.format import Format, float16_bytes, float16s

SUPER = 256


@dataclass(frozen=True)
class KQuant(Format):
    high_bits: bool = False  # q5_k's fifth bits

    D, DMIN, SCALES, QH = 0, 2, 4, 16

    @property
    def qs_at(self) -> int:  # the 128 bytes of nibbles, last in the block
        return self.block_bytes - 128

    def read(self, blocks):
        n = blocks.shape[0]
        d, dmin = float16s(blocks[:, self.D:self.D + 2]), float16s(blocks[:, self.DMIN:self.DMIN + 2])
        sc, mn = scale_min(blocks[:, self.SCALES:self.SCALES + 12])
        qs = blocks[:, self.qs_at:].astype(np.int32).reshape(n, 4, 1, 32)
        w = (qs >> np.array([0, 4]).reshape(1, 1, 2, 1) & 15).reshape(n, 8, 32)
        if self.high_bits:
            qh = blocks[:, self.QH:self.QH + 32].astype(np.int32).reshape(n, 1, 32)
            w |= (qh >> np.arange(8).reshape(1, 8, 1) & 1) << 4
        scale = (d * sc.astype(np.float32)).reshape(-1, 1)
        minimum = -(dmin * mn.astype(np.float32)).reshape(-1, 1)
        return w.reshape(-1, 32), np.broadcast_to(scale, (n * 8, 32)), minimum

    def quantize(self, x):
        """Each sub-block's scale and minimum is its range over the integers' range, the 6-bit
        scales of a super-block the nearest steps of its largest one: llama.cpp's layout,
        without the search for the scale that its quantize_row_*_ref makes (a little more
        rounding error)."""
        sub = np.ascontiguousarray(x, np.float32).reshape(-1, 8, 32)
        n, levels = sub.shape[0], (1 << self.bits) - 1
        out = np.zeros((n, self.block_bytes), np.uint8)
        low = np.minimum(sub.min(-1), 0)              # x = scale * q - minimum, minimum = -low >= 0
        scale, minimum = (sub.max(-1) - low) / levels, -low
        d, sc = _steps(scale, 63)
        dmin, mn = _steps(minimum, 63)
        step = (d[:, None] * sc)[..., None]
        q = np.clip(np.rint(np.divide(sub + (dmin[:, None] * mn)[..., None], step, out=np.zeros_like(sub),
                                      where=step > 0)), 0, levels).astype(np.uint8)
        out[:, self.D:self.D + 2], out[:, self.DMIN:self.DMIN + 2] = float16_bytes(d), float16_bytes(dmin)
        sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
        scales = out[:, self.SCALES:self.SCALES + 12]  # scale_min's packing, written
        scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
        scales[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
        scales[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
        nibbles = (q & 15).reshape(n, 4, 2, 32)
        out[:, self.qs_at:] = (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(n, 128)
        if self.high_bits:
            out[:, self.QH:self.QH + 32] = ((q >> 4) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(1, dtype=np.uint8)
        return out.reshape(x.shape[0], -1)


def scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes [n, 12] -> 6-bit scales and minimums [n, 8]: sub-blocks 0-3 in the low
    6 bits of bytes 0-3 and 4-7; 4-7 in the nibbles of bytes 8-11, their top two bits in the top
    bits of bytes 0-3 (scales) and 4-7 (minimums)."""
    s = scales.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _steps(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative values [n, 8] -> (d float32 [n], rounded to float16; integers 0..top [n, 8])
    with d * integer close to each value: d = max / top."""
    d = (values.max(-1) / top).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(np.divide(values, d[:, None], out=np.zeros_like(values), where=d[:, None] > 0)), 0, top)
    return d, q.astype(np.int32)
