"""Turning recorded nodes into values: plan the graph, hand the schedule to the chosen backend,
and make the results buffers that later graphs read instead of recomputing."""
import os
import sys
import backends
from tinytensor import graph


def debug_level() -> int:
    return int(os.environ.get("TT_DEBUG", "0") or 0)


def realize(nodes) -> None:
    todo = [n for n in dict.fromkeys(nodes) if not n.realized]
    if not todo:
        return
    schedule, canonical = graph.plan(todo)
    todo = list(canonical)  # the outputs and the writes made on the way
    backend = backends.current()
    if debug_level() >= 1:
        print(f"[tinytensor] {backend.name}: {len(schedule.nodes)} ops\n{graph.describe(schedule)}",
              file=sys.stderr)
    results = dict(zip(schedule.outputs, backend.execute(schedule)))

    # A buffer may take in-place writes only if nothing else can see its storage: not an input,
    # not a view of one. Distinct tensors that computed the same value (merged by CSE) each get
    # their own copy, so each can be written on its own (a KV cache of identical zero buffers).
    inputs = {id(s.buffer) for n in schedule.nodes for s in n.srcs if s.realized}
    handed_out = set()
    for node in todo:
        array = results[canonical[node]]
        if id(array) in handed_out:
            array = array.copy()
        handed_out.add(id(array))
        if canonical[node] in schedule.in_place:
            owned = True  # the target's own storage, passed on to its new value
        else:
            owned = array.flags.owndata and array.flags.writeable and id(array) not in inputs
        node.become_buffer(array, bool(owned))
