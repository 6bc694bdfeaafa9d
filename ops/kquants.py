"""The bytes of the K-quants' super-blocks (ggml's block_q4_K, block_q5_K, block_q6_K), read
into ops.blocks' common form: per sub-block of 32 values, signed integers, a scale per value and
a minimum. 256 values per super-block; offsets in bytes:

    q4_k: d f16 @0, dmin f16 @2, scales 12 B @4, qs 128 B @16
    q5_k: d f16 @0, dmin f16 @2, scales 12 B @4, qh 32 B @16, qs 128 B @48
    q6_k: ql 128 B @0, qh 64 B @128, scales int8[16] @192, d f16 @208

q4_k/q5_k: sub-block s has a 6-bit scale sc and minimum mn packed in the 12 bytes (`scale_min`),
value = (d * sc) * q - (dmin * mn); its 32 values are the low (s even) or high (s odd) nibbles
of qs[32 * (s // 2):][:32], and for q5_k bit s of qh[l] is value l's fifth bit.
q6_k: half h = s // 4 of the super-block, t = s % 4 within it: the low 4 bits of value l are
nibble (t // 2) of ql[64h + 32(t % 2) + l], the high 2 bits are bits 2t, 2t+1 of qh[32h + l];
value = (d * sc) * (q - 32), sc = scales[8h + 2t + l // 16] (two scales per sub-block).
"""
import numpy as np

SUPER = 256


def scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes [n, 12] -> 6-bit scales and minimums [n, 8]: sub-blocks 0-3 in the low
    6 bits of bytes 0-3 and 4-7; 4-7 in the nibbles of bytes 8-11, their top two bits in the top
    bits of bytes 0-3 (scales) and 4-7 (minimums)."""
    s = scales.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def sub_blocks(blocks: np.ndarray, f):
    """ops.blocks.sub_blocks for the K-quants: (w int32 [n * 8, 32], scale float32 [n * 8, 32],
    minimum float32 [n * 8, 1] or None)."""
    n = blocks.shape[0]
    if f.name == "q6_k":
        ql, qh = blocks[:, :128].astype(np.int32), blocks[:, 128:192].astype(np.int32)
        w = np.empty((n, 8, 32), np.int32)
        for s in range(8):
            h, t = divmod(s, 4)
            low = ql[:, 64 * h + 32 * (t % 2):][:, :32] >> (4 * (t // 2)) & 15
            w[:, s] = (low | ((qh[:, 32 * h:32 * h + 32] >> (2 * t) & 3) << 4)) - 32
        d = _halves(blocks[:, 208:210])
        scale = (d * blocks[:, 192:208].view(np.int8).astype(np.float32))  # [n, 16], one per 16 values
        return w.reshape(-1, 32), np.repeat(scale, 16, axis=1).reshape(-1, 32), None
    d, dmin = _halves(blocks[:, 0:2]), _halves(blocks[:, 2:4])
    sc, mn = scale_min(blocks[:, 4:16])
    qs = blocks[:, -128:].astype(np.int32).reshape(n, 4, 1, 32)
    w = (qs >> np.array([0, 4]).reshape(1, 1, 2, 1) & 15).reshape(n, 8, 32)
    if f.high_bits:
        qh = blocks[:, 16:48].astype(np.int32).reshape(n, 1, 32)
        w |= (qh >> np.arange(8).reshape(1, 8, 1) & 1) << 4
    scale = (d * sc.astype(np.float32)).reshape(-1, 1)
    minimum = -(dmin * mn.astype(np.float32)).reshape(-1, 1)
    return w.reshape(-1, 32), np.broadcast_to(scale, (n * 8, 32)), minimum


def _halves(raw: np.ndarray) -> np.ndarray:
    """float16 fields [n, 2 bytes] -> float32 [n, 1]."""
    return raw.copy().view("<f2").astype(np.float32)


# ---- writing: float32 values -> super-blocks -------------------------------------------------

def quantize(x: np.ndarray, f) -> np.ndarray:
    """float32 [n, K] (K a multiple of 256) -> the blocks of format f [n, K / 256 * block_bytes].
    Each sub-block's scale (and minimum) is its range over the integers' range, the 6- or 8-bit
    scales of a super-block the nearest steps of its largest one: llama.cpp's layout, without
    the search for the scale that its quantize_row_*_ref makes (a little more rounding error)."""
    blocks = np.ascontiguousarray(x, np.float32).reshape(-1, SUPER)
    out = np.zeros((blocks.shape[0], f.block_bytes), np.uint8)
    if f.name == "q6_k":
        _pack_q6_k(blocks, out)
    else:
        _pack_q45_k(blocks, out, levels=(1 << f.bits) - 1, high_bits=f.high_bits)
    return out.reshape(x.shape[0], -1)


def _pack_q45_k(x, out, levels: int, high_bits: bool):
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(-1), 0)              # x = scale * q - minimum, minimum = -low >= 0
    scale, minimum = (sub.max(-1) - low) / levels, -low
    d, sc = _steps(scale, 63)
    dmin, mn = _steps(minimum, 63)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.rint(np.divide(sub + (dmin[:, None] * mn)[..., None], step, out=np.zeros_like(sub), where=step > 0)),
                0, levels).astype(np.uint8)
    out[:, 0:2], out[:, 2:4] = _half_bytes(d), _half_bytes(dmin)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out[:, 4:8] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    nibbles = (q & 15).reshape(n, 4, 2, 32)
    out[:, -128:] = (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(n, 128)
    if high_bits:
        out[:, 16:48] = ((q >> 4) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(1, dtype=np.uint8)


def _pack_q6_k(x, out):
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    amax = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]  # signed
    scale = amax / -32  # the largest magnitude becomes -32
    big = np.take_along_axis(scale, np.abs(scale).argmax(-1)[:, None], -1)  # [n, 1], signed
    d = np.where(big != 0, big / -128, 0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d, out=np.zeros_like(scale), where=d != 0)), -128, 127)
    step = np.repeat(d * sc, 16, axis=1).reshape(n, 256)
    values = x.reshape(n, 256)
    q = (np.clip(np.rint(np.divide(values, step, out=np.zeros_like(values), where=step != 0)), -32, 31) + 32
         ).astype(np.uint8).reshape(n, 2, 4, 32)  # [half, t, l]
    # ql: half h's bytes 32 (t % 2) + l hold value t's low bits, value t + 2's in the high nibble
    out[:, :128] = np.concatenate([(q[:, h, t] & 15) | ((q[:, h, t + 2] & 15) << 4) for h in (0, 1) for t in (0, 1)],
                                  axis=1)
    out[:, 128:192] = np.concatenate([sum(((q[:, h, t] >> 4) << (2 * t)).astype(np.uint8) for t in range(4))
                                      for h in (0, 1)], axis=1)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = _half_bytes(d[:, 0])


def _steps(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative values [n, 8] -> (d float32 [n], rounded to float16; integers 0..top [n, 8])
    with d * integer close to each value: d = max / top."""
    d = (values.max(-1) / top).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(np.divide(values, d[:, None], out=np.zeros_like(values), where=d[:, None] > 0)), 0, top)
    return d, q.astype(np.int32)


def _half_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)
