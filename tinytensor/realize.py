"""Turning recorded nodes into values: plan the graph, hand the schedule to the chosen backend,
and make the results buffers that later graphs read instead of recomputing."""
import os
import sys
from collections import Counter

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
    # not another result, not a view of either.
    inputs = {id(s.buffer) for n in schedule.nodes for s in n.srcs if s.realized}
    sharers = Counter(id(results[canonical[n]]) for n in todo)
    for node in todo:
        array = results[canonical[node]]
        if canonical[node] in schedule.in_place:
            owned = sharers[id(array)] == 1  # the target's own storage, passed on to its new value
        else:
            owned = (array.flags.owndata and array.flags.writeable
                     and id(array) not in inputs and sharers[id(array)] == 1)
        node.become_buffer(array, bool(owned))
