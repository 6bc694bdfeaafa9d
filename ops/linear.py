"""The ops the matmul and attention fusions make, each with its NumPy meaning.

fused_linear: y = epilogue(norm(a) @ w1.T, ..., norm(a) @ wj.T, e1, ..., er)
    srcs (a [m, k], [g [k]], w1 [n, k] ... wj [n, k], e1 [m, n] ... er [m, n]);
    arg Linear(eps, n_weights, src_types, program). eps None: no norm; otherwise norm(a) is Llama's RMSNorm,
    a * rsqrt(mean(a^2) + eps) * g, computed in float32 as nn.rms_norm computes it. The weights
    keep their stored dtype (a kernel widens them in registers); block-quantised ones multiply
    norm(a) quantised to 8 bits, one scale per block of their format (ops.blocks.product), as
    llama.cpp does. The program (see ops.fused) reads the j products (float32) then the extras;
    an empty program means the first product, and "concat" the products side by side
    ([m, n1 + ... + nj]: Q, K and V from one kernel).
    Covers RMSNorm -> matmul, SwiGLU (silu(x @ Wg.T) * (x @ Wu.T)) and a residual add.

attention: softmax(q @ k^T * scale + mask) @ v over the last two axes
    srcs (q [*b, L, d], k [*b, S, d], v [*b, S, dv], [mask [*b, L, S]]); arg (scale, mask kind:
    None, "bool" (True = attend) or "add"). The batch axes match (grouped-query heads are an
    expanded view of k and v). A row that sees no key gives NaN, as the unfused softmax does.
"""
from typing import NamedTuple

import numpy as np

from ops import blocks, dtypes
from ops.fused import Instruction, run_program
from ops.registry import define, run_reference, shape_str


class Linear(NamedTuple):
    eps: float | None                   # the RMSNorm's epsilon; None: no norm
    n_weights: int                      # j products
    src_types: tuple[dtypes.DType, ...]
    program: tuple[Instruction, ...] | str  # the epilogue; () the first product; "concat" side by side


class Attention(NamedTuple):
    scale: float
    mask: str | None                    # None, "bool" (True = attend) or "add"

F32 = np.float32


def rms_norm_programs(k: int, eps: float, g_type: dtypes.DType):
    """Llama's RMSNorm of rows of k float32 values, as nn.rms_norm's ops compute it, in two
    programs (see ops.fused): `squares`, summed over the row (fused_reduce), then `scale` over
    (x, that sum, g): x * rsqrt(sum / k + eps) * g. The NumPy meaning below and the llvm kernels
    (backends/llvm/lowering.py) both run these, so they round at the same steps."""
    f32 = dtypes.float32
    squares = (Instruction("mul", None, (0, 0), f32),)
    scale = (Instruction("const", (float(k),), (), f32), Instruction("div", None, (1, 3), f32),
             Instruction("const", (eps,), (), f32), Instruction("add", None, (4, 5), f32),
             Instruction("rsqrt", None, (6,), f32), Instruction("mul", None, (0, 7), f32),
             Instruction("mul", None, (8, 2), f32))
    return squares, scale


def rms_normalize(a: np.ndarray, g: np.ndarray, g_type: dtypes.DType, eps: float) -> np.ndarray:
    """rms_norm_programs run on float32 rows a [m, k] and the stored norm weight g [k]."""
    f32 = dtypes.float32
    squares, scale = rms_norm_programs(a.shape[-1], eps, g_type)
    total = run_reference("sum", [run_program(squares, [a], [f32], a.shape)], [f32], (1,), a.shape[:1] + (1,), f32)
    return run_program(scale, [a, np.broadcast_to(total, a.shape), np.broadcast_to(g, a.shape)],
                       [f32, f32, g_type], a.shape)


def _linear_parts(srcs, arg: Linear):
    """(input, norm weight or None, weights, extras) of srcs laid out as fused_linear's."""
    first, j = (2 if arg.eps is not None else 1), arg.n_weights
    return srcs[0], (srcs[1] if arg.eps is not None else None), srcs[first:first + j], srcs[first + j:]


def _linear_infer(srcs, arg):
    a, g, weights, extras = _linear_parts(srcs, arg)
    program = arg.program
    m, k = a.shape
    concat = program == "concat"
    for w in weights:
        if w.shape[1] != k or (not concat and w.shape[0] != weights[0].shape[0]):
            raise ValueError(f"fused_linear: weight {w.shape} does not fit input {shape_str(a.shape)}")
    shape = (m, sum(w.shape[0] for w in weights) if concat else weights[0].shape[0])
    if g is not None and g.shape != (k,):
        raise ValueError(f"fused_linear: norm weight {g.shape} does not fit input {a.shape}")
    if any(e.shape != shape for e in extras):
        raise ValueError(f"fused_linear: extra inputs {[e.shape for e in extras]} must have shape {shape}")
    return shape, program[-1].dtype if program and not concat else dtypes.float32


def _linear_reference(xs, arg: Linear, shape, dtype):
    j, src_types, program = arg.n_weights, arg.src_types, arg.program
    a, g, weights, extras = _linear_parts(xs, arg)
    a_type, g_type, w_types, extra_types = _linear_parts(src_types, arg)
    a = dtypes.widen(a, a_type)
    a = rms_normalize(a, g, g_type, arg.eps) if g is not None else a
    # a block-quantised weight meets 8-bit activations (ops.blocks.product)
    products = [blocks.product(a, w, t.block) if t.block else np.matmul(a, dtypes.widen(w, t).T)
                for w, t in zip(weights, w_types)]
    if program == "concat":
        return np.concatenate(products, axis=-1)
    if not program:
        return products[0]
    return run_program(program, products + list(extras), (dtypes.float32,) * j + tuple(extra_types), shape)


def _attention_infer(srcs, arg):
    q, k, v = srcs[:3]
    *batch, length, d = q.shape
    ok = k.shape == (*batch, k.shape[-2], d) and v.shape[:-1] == k.shape[:-1]
    if len(srcs) == 4:
        ok = ok and srcs[3].shape == (*batch, length, k.shape[-2])
    if not ok:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    return (*batch, length, v.shape[-1]), dtypes.float32


def _attention_reference(xs, arg: Attention, shape, dtype):
    scale, mask_kind = arg.scale, arg.mask
    q, k, v = (x.astype(F32, copy=False) for x in xs[:3])
    with np.errstate(all="ignore"):  # inf and nan are values here, as in ops.registry.run_reference
        scores = np.matmul(q, np.swapaxes(k, -1, -2)) * F32(scale)
        if mask_kind == "bool":
            scores = np.where(xs[3], scores, F32(-np.inf))
        elif mask_kind == "add":
            scores = scores + xs[3].astype(F32)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        return np.matmul(e / e.sum(-1, keepdims=True, dtype=F32), v)


define("fused_linear", _linear_infer, _linear_reference, computes=False)
define("attention", _attention_infer, _attention_reference, computes=False)
