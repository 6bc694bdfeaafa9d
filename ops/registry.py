"""What an op is: a name, a rule that gives the result's shape and dtype (and rejects bad
inputs while the graph is being recorded), and one reference meaning written with NumPy.

Every backend must compute what `reference` computes; the NumPy interpreter simply calls it.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ops import dtypes


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: Callable    # (srcs with .shape/.dtype, arg) -> (shape, dtype); raises ValueError
    reference: Callable  # (inputs, arg, shape, dtype) -> np.ndarray
    computes: bool = True  # inputs are widened to float32 and the result rounded to its dtype


OPS: dict[str, OpDef] = {}


def define(name: str, infer: Callable, reference: Callable, computes: bool = True) -> OpDef:
    assert name not in OPS, f"op {name} defined twice"
    OPS[name] = OpDef(name, infer, reference, computes)
    return OPS[name]


# what may read a block-quantised weight (ops/blocks/); views record for x @ W.T and are
# folded into the product before anything runs (see run_reference)
BLOCK_READERS = {"cast", "gather", "matmul", "fused_linear", "permute", "reshape", "expand"}
BLOCK_RUNS = {"cast", "gather", "fused_linear"}


def infer(op: str, srcs, arg):
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    block = next((s.dtype for s in srcs if s.dtype.block), None)
    if block and (op not in BLOCK_READERS or (op == "gather" and arg == len(srcs[0].shape) - 1)):
        raise ValueError(f"{op} of a {block.name} tensor: block-quantised weights can be read by rows, "
                         f"multiplied (x @ W.T) or cast; cast it to float32 first")
    if op == "cast" and arg.block:
        raise ValueError(f"cannot cast to {arg.name}: quantise with tools.quantize or load(dtype=...)")
    return OPS[op].infer(srcs, arg)


def run_reference(op: str, arrays, src_dtypes, arg, shape, dtype) -> np.ndarray:
    """Evaluate one op with NumPy, on storage-form inputs, returning a storage-form array."""
    d = OPS[op]
    if op not in BLOCK_RUNS and any(s.block for s in src_dtypes):
        raise ValueError(f"{op} of a block-quantised tensor ({', '.join(s.name for s in src_dtypes)}) cannot run "
                         f"on its bytes: only x @ W.T reads it as stored (as fused_linear: the fuse_linear pass); "
                         f"cast it to float32 first")
    if not d.computes:
        return d.reference(arrays, arg, shape, dtype)
    wide = [dtypes.widen(x, x_dtype) for x, x_dtype in zip(arrays, src_dtypes)]
    with np.errstate(all="ignore"):  # inf and nan are values here, as in IEEE hardware
        out = d.reference(wide, arg, shape, dtype)
    out = dtypes.narrow(np.asarray(out), dtype)
    return out if out.shape == tuple(shape) else out.reshape(shape)  # a needless reshape is a view


def shape_str(*shapes) -> str:
    return " and ".join(str(tuple(s)) for s in shapes)
