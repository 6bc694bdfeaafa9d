"""The ops the fusion passes make. Each holds a *program*: instructions (op, arg, operands, dtype)
where operands index the op's inputs first, then earlier instructions' results. Its meaning is
running the instructions one by one with their own meanings, so a fused graph computes exactly
what the unfused one did.

- fused:        arg Fused(in_types, program): the last instruction's value, one elementwise kernel
- fused_reduce: arg FusedReduce(reduce, axes, in_types, program): the program's value, reduced

The arguments are NamedTuples: immutable and hashable (kernels are cached by them), read by name.
"""
from typing import NamedTuple

from ops import dtypes
from ops.registry import OPS, define, run_reference


class Instruction(NamedTuple):
    op: str
    arg: object
    operands: tuple[int, ...]  # indices into the inputs, then earlier instructions' results
    dtype: dtypes.DType


class Fused(NamedTuple):
    in_types: tuple[dtypes.DType, ...]
    program: tuple[Instruction, ...]


class FusedReduce(NamedTuple):
    reduce: str                 # "sum", "max" or "min"
    axes: tuple[int, ...]
    in_types: tuple[dtypes.DType, ...]
    program: tuple[Instruction, ...]


def run_program(program, arrays, in_types, shape):
    values, types = list(arrays), list(in_types)
    for op, arg, operands, dtype in program:
        values.append(run_reference(op, [values[i] for i in operands], [types[i] for i in operands], arg,
                                    shape, dtype))
        types.append(dtype)
    return values[-1]


def _program_shape(srcs, program):
    shapes = {s.shape for s in srcs}
    if len(shapes) != 1:
        raise ValueError(f"fused: needs inputs of one shape, got {sorted(shapes)}")
    return shapes.pop()


def _fused_infer(srcs, arg: Fused):
    return _program_shape(srcs, arg.program), arg.program[-1].dtype


def _fused_reduce_infer(srcs, arg: FusedReduce):
    shape = _program_shape(srcs, arg.program)
    return OPS[arg.reduce].infer([_Like(shape, arg.program[-1].dtype)], arg.axes)


class _Like:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def _fused_reference(xs, arg: Fused, shape, dtype):
    return run_program(arg.program, xs, arg.in_types, shape)


def _fused_reduce_reference(xs, arg: FusedReduce, shape, dtype):
    value = run_program(arg.program, xs, arg.in_types, xs[0].shape)
    return run_reference(arg.reduce, [value], [arg.program[-1].dtype], arg.axes, shape, dtype)


define("fused", _fused_infer, _fused_reference, computes=False)
define("fused_reduce", _fused_reduce_infer, _fused_reduce_reference, computes=False)
