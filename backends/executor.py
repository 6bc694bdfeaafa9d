"""Running a schedule: the loop every backend shares. It hands each node's input arrays to the
backend's `run_node`, performs the planned in-place writes (through `write`), and drops
intermediates as soon as their last reader has run, unless `keep_all` (a prepared replay, whose
buffers live as long as it does)."""
from ops.memory import write_in_place


def run_schedule(schedule, run_node, write=write_in_place, values=None, keep_all=False) -> list:
    """The arrays of schedule.outputs. values: arrays already known for some nodes (inputs)."""
    last_use = {}
    for i, node in enumerate(schedule.nodes):
        for src in node.srcs:
            last_use[src] = i
    keep = set(schedule.outputs)
    values = dict(values or {})
    for i, node in enumerate(schedule.nodes):
        arrays = [values[s] if s in values else s.buffer for s in node.srcs]
        if node in schedule.in_place:
            write(node.op, node.arg, arrays)
            values[node] = arrays[0]
        else:
            values[node] = run_node(node, arrays)
        if keep_all:
            continue
        for src in node.srcs:
            if last_use.get(src) == i and src in values and src not in keep:
                del values[src]
    return [values[n] for n in schedule.outputs]
