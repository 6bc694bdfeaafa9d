"""The LLVM backend: schedules run with native kernels for the host CPU, compiled once per
kernel structure and run on all threads (see lowering.py), and the NumPy reference for the rest.

Eager execution lowers and runs node by node; `prepare` lowers a captured schedule once (see
tinytensor.jit) over buffers fixed for its lifetime, so a replay is a flat list of native calls.
"""
from functools import partial

import numpy as np

from backends.executor import run_schedule
from backends.llvm.lowering import native, plan_node
from backends.llvm.plan import Plan
from backends.llvm.writes import plan_write
from backends.numpy_backend import run_node as reference_node
from ops.movement import VIEWS


def run_node(node, arrays):
    if not native(node):
        return reference_node(node, arrays)
    out = np.empty(node.dtype.storage_shape(node.shape), node.dtype.storage)
    plan = Plan(fixed=False)
    plan_node(plan, node, arrays, out)
    plan.run()
    return out


class LLVMBackend:
    name = "llvm"

    def execute(self, schedule):
        return run_schedule(schedule, run_node)

    def prepare(self, schedule, inputs):
        """A function that reruns `schedule`: every buffer is allocated here once, input values
        are copied into fixed arrays on each run, and each step is a bound native call."""
        plan, fixed = Plan(fixed=True), {placeholder: np.array(placeholder.buffer) for placeholder in inputs}
        for placeholder, array in fixed.items():
            plan.steps.append(partial(lambda f, p: np.copyto(f, p.buffer), array, placeholder))
        outputs = run_schedule(schedule, partial(_prepare_node, plan), values=fixed, keep_all=True,
                               write=partial(plan_write, plan))
        return lambda: (plan.run(), [o.copy() for o in outputs])[1]


def _prepare_node(plan, node, arrays):
    """The fixed array that will hold node's value on every replay, and the steps that fill it."""
    if native(node):
        out = np.empty(node.dtype.storage_shape(node.shape), node.dtype.storage)
        plan_node(plan, node, arrays, out)
        return out
    reference = partial(reference_node, node, arrays)
    if not node.srcs:
        return reference()  # a constant stays constant
    if node.op in VIEWS:
        result = reference()
        if any(np.shares_memory(result, a) for a in arrays):
            return result  # a view of fixed buffers stays valid
    # Anything else runs only on replay: here the native steps before it have not run, so its
    # inputs hold no values yet (a gather's indices computed in the graph would be garbage)
    out = np.empty(node.dtype.storage_shape(node.shape), node.dtype.storage)
    plan.steps.append(partial(lambda o, f: np.copyto(o, f()), out, reference))
    return out


BACKEND = LLVMBackend()
