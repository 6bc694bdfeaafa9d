"""The in-place writes of a captured step as native kernels: assign_at (a KV cache's new
positions, where the position is data read when the step runs). A write done by Python
between two kernels ends the pool's native run there (threads.Run), and a decode step writes
each layer's keys and values: SmolLM2's step ran as 62 native runs, now as one."""
from functools import partial

import numpy as np

from backends.llvm import signatures
from backends.llvm.kernel import Kernel
from backends.llvm.plan import collapse, kernel
from ops.memory import write_in_place


def plan_write(plan, op: str, arg, arrays) -> None:
    """The step that performs a planned in-place write: a native kernel where it can be one,
    else ops.memory's (NumPy) on this thread."""
    call = _assign_at_call(arg, *arrays) if op == "assign_at" else None
    if call is None:
        plan.steps.append(partial(write_in_place, op, arg, arrays))
        return
    plan.keep += list(arrays)
    plan.kernel([call])


def _assign_at_call(axis: int, target: np.ndarray, value: np.ndarray, start: np.ndarray):
    """The kernel call that writes value into target from start along axis, or None when the
    arrays do not have the kernel's form: the axes after `axis` one contiguous run of bytes in
    both, the axes before it one strided loop, start one int64."""
    if start.dtype != np.int64 or start.size != 1 or target.dtype != value.dtype or value.shape[axis] == 0:
        return None
    inner = target.shape[axis + 1:]
    run = int(np.prod(inner, dtype=np.int64)) * target.itemsize
    for a in (target, value):
        packed = np.cumprod((a.itemsize,) + inner[:0:-1])[::-1] if inner else ()
        if tuple(s for s, n in zip(a.strides[axis + 1:], inner) if n != 1) != \
                tuple(s for s, n in zip(packed, inner) if n != 1):
            return None
    dims, (t_strides, v_strides) = collapse(target.shape[:axis] or (1,),
                                            [list(target.strides[:axis]) or [0], list(value.strides[:axis]) or [0]])
    if len(dims) != 1:
        return None
    fn = kernel(("assign_at",), _assign_at_kernel, signatures.ASSIGN_AT)
    return partial(fn, 0, dims[0], target.ctypes.data, value.ctypes.data, start.ctypes.data, value.shape[axis],
                   target.shape[axis], t_strides[0], target.strides[axis], v_strides[0], value.strides[axis], run)


def _assign_at_kernel(name: str) -> str:
    """Copies each outer index's n runs of bytes, when 0 <= start <= length - n; a start
    outside writes nothing (the NumPy reference would refuse it, and a replay cannot raise)."""
    k = Kernel(name, signatures.ASSIGN_AT)
    start = k.op("load i64, ptr %start")
    last = k.op("sub i64 %length, %n")
    fits = k.op(f"and i1 {k.op(f'icmp sge i64 {start}, 0')}, {k.op(f'icmp sle i64 {start}, {last}')}")
    with k.when(fits, hint="fits"):
        with k.loop("%o0", "%o1", hint="outer") as o:
            to = k.at("%T", k.add(k.mul(o, "%t_outer"), k.mul(start, "%t_axis")), "i8")
            vo = k.at("%V", k.mul(o, "%v_outer"), "i8")
            with k.loop("0", "%n", hint="row") as j:
                k.raw(f"  call void @llvm.memcpy.p0.p0.i64(ptr {k.at(to, k.mul(j, '%t_axis'), 'i8')}, "
                      f"ptr {k.at(vo, k.mul(j, '%v_axis'), 'i8')}, i64 %bytes, i1 false)")
    return k.finish()
