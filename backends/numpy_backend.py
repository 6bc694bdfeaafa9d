"""The reference backend: runs each scheduled op with its NumPy meaning from `ops`.
Every other backend is tested against this one."""
import ops
from ops.movement import slices_of


class NumpyBackend:
    name = "numpy"

    def execute(self, schedule):
        last_use = {}
        for i, node in enumerate(schedule.nodes):
            for src in node.srcs:
                last_use[src] = i
        keep = set(schedule.outputs)
        values = {}
        for i, node in enumerate(schedule.nodes):
            arrays = [values[s] if s in values else s.buffer for s in node.srcs]
            if node in schedule.in_place:
                arrays[0][slices_of(node.arg)] = arrays[1]
                values[node] = arrays[0]
            else:
                values[node] = ops.run_reference(node.op, arrays, [s.dtype for s in node.srcs],
                                                 node.arg, node.shape, node.dtype)
            for src in node.srcs:  # free intermediates as soon as nothing else reads them
                if last_use.get(src) == i and src in values and src not in keep:
                    del values[src]
        return [values[n] for n in schedule.outputs]


BACKEND = NumpyBackend()
