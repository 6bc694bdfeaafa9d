"""The reference backend: runs each scheduled op with its NumPy meaning from `ops`.
Every other backend is tested against this one."""
import ops
from backends.executor import run_schedule


def run_node(node, arrays):
    return ops.run_reference(node.op, arrays, [s.dtype for s in node.srcs], node.arg, node.shape, node.dtype)


class NumpyBackend:
    name = "numpy"

    def execute(self, schedule):
        return run_schedule(schedule, run_node)


BACKEND = NumpyBackend()
