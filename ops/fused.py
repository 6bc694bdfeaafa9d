"""The ops the fusion passes make. Each holds a *program*: instructions (op, arg, operands, dtype)
where operands index the op's inputs first, then earlier instructions' results. Its meaning is
running the instructions one by one with their own meanings, so a fused graph computes exactly
what the unfused one did.

- fused:        arg (input dtypes, program): the last instruction's value, one elementwise kernel
- fused_reduce: arg (reduce op, axes, input dtypes, program): the program's value, reduced
"""
from ops.registry import OPS, define, run_reference


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


def _fused_infer(srcs, arg):
    in_types, program = arg
    return _program_shape(srcs, program), program[-1][3]


def _fused_reduce_infer(srcs, arg):
    reduce, axes, in_types, program = arg
    shape = _program_shape(srcs, program)
    return OPS[reduce].infer([_Like(shape, program[-1][3])], axes)


class _Like:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def _fused_reference(xs, arg, shape, dtype):
    in_types, program = arg
    return run_program(program, xs, in_types, shape)


def _fused_reduce_reference(xs, arg, shape, dtype):
    reduce, axes, in_types, program = arg
    value = run_program(program, xs, in_types, xs[0].shape)
    return run_reference(reduce, [value], [program[-1][3]], axes, shape, dtype)


define("fused", _fused_infer, _fused_reference, computes=False)
define("fused_reduce", _fused_reduce_infer, _fused_reduce_reference, computes=False)
