"""Capture a function that builds the same graph on every call (a decode step) and replay it.

The first call with a given set of input shapes records the graph as usual, plans it, and keeps
a private copy of the schedule in which the input tensors are placeholders. Later calls skip
recording and planning: they bind the new input buffers to the placeholders and hand the same
schedule to the backend (which may keep compiled kernels and buffers for it). Whatever must
change between calls — token ids, the position in the KV cache — is passed as a tensor, so it
is data, not structure, and one capture serves every position.

    step = jit(lambda token, pos: model.forward(token, pos, cache))
    logits = step(Tensor([token]), Tensor([pos]))
"""
import backends
from tinytensor import graph
from tinytensor.graph import Node, Schedule
from tinytensor.realize import realize
from tinytensor.tensor import Tensor


class Capture:
    def __init__(self, schedule: Schedule, output: Node, inputs: list[Node]):
        """Copy the schedule's nodes, so that realising the originals does not erase it."""
        copies, self.placeholders = {}, []
        for node in inputs:
            placeholder = Node.of_buffer(node.buffer, node.dtype, writable=False)
            copies[node] = placeholder
            self.placeholders.append(placeholder)
        for node in schedule.nodes:
            copy = Node.__new__(Node)
            copy.op, copy.arg, copy.shape, copy.dtype = node.op, node.arg, node.shape, node.dtype
            copy.srcs = tuple(copies.get(s, s) for s in node.srcs)
            copy.buffer, copy.writable = None, False
            copies[node] = copy
        self.schedule = Schedule([copies[n] for n in schedule.nodes], [copies[output]],
                                 {copies[n] for n in schedule.in_place})
        self.runner = None

    def run(self, inputs: list[Tensor]) -> Tensor:
        for placeholder, t in zip(self.placeholders, inputs):
            placeholder.buffer = t.node.buffer
        backend = backends.current()
        if self.runner is None:
            prepare = getattr(backend, "prepare", None)
            self.runner = prepare(self.schedule, self.placeholders) if prepare else \
                (lambda: backend.execute(self.schedule))
        (out,) = self.runner()
        return Tensor(Node.of_buffer(out, self.schedule.outputs[0].dtype, writable=False))


class jit:  # noqa: N801  (used as a decorator, like functools.cache)
    def __init__(self, fn):
        self.fn, self.captures = fn, {}

    def __call__(self, *inputs: Tensor) -> Tensor:
        if inputs:
            inputs[0].realize(*inputs[1:])
        key = (backends.current_name(), tuple((t.shape, t.dtype) for t in inputs))
        if key in self.captures:
            return self.captures[key].run(list(inputs))
        out = self.fn(*inputs)
        schedule, canonical = graph.plan([out.node])
        lost = [n for n in schedule.nodes if n.op in graph.WRITES and n not in schedule.in_place]
        if lost:
            raise ValueError(f"jit: {len(lost)} write(s) into a tensor that does not own its buffer would "
                             f"go to a copy on replay; realize the target (e.g. .contiguous().realize()) first")
        self.captures[key] = Capture(schedule, canonical[out.node], [t.node for t in inputs])
        realize([out.node])  # the first call runs as usual, writes included
        return out
