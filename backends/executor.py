"""Running a schedule: the loop every backend shares. It hands each node's input arrays to the
backend's `run_node`, performs the planned in-place writes, and drops intermediates as soon as
their last reader has run."""
from ops.memory import write_in_place


def run_schedule(schedule, run_node) -> list:
    last_use = {}
    for i, node in enumerate(schedule.nodes):
        for src in node.srcs:
            last_use[src] = i
    keep = set(schedule.outputs)
    values = {}
    for i, node in enumerate(schedule.nodes):
        arrays = [values[s] if s in values else s.buffer for s in node.srcs]
        if node in schedule.in_place:
            write_in_place(node.op, node.arg, arrays)
            values[node] = arrays[0]
        else:
            values[node] = run_node(node, arrays)
        for src in node.srcs:
            if last_use.get(src) == i and src in values and src not in keep:
                del values[src]
    return [values[n] for n in schedule.outputs]
