"""A node of the lazy graph: one recorded op."""
import ops
from ops import dtypes


class Node:
    """One recorded op: what it is (op, arg), what it reads (srcs), what it makes (shape, dtype).
    Once realised it becomes a "buffer" node holding its array, and forgets how it was made."""
    __slots__ = ("op", "srcs", "arg", "shape", "dtype", "buffer", "writable")

    def __init__(self, op: str, srcs=(), arg=None):
        self.op, self.srcs, self.arg = op, tuple(srcs), arg
        self.shape, self.dtype = ops.infer(op, self.srcs, arg)
        self.buffer, self.writable = None, False

    @classmethod
    def of_buffer(cls, array, dtype: dtypes.DType, writable: bool) -> "Node":
        if array.dtype != dtype.storage:
            raise TypeError(f"a {dtype} buffer must hold {dtype.storage}, got {array.dtype}")
        node = cls.__new__(cls)
        node.op, node.srcs, node.arg = "buffer", (), None
        node.shape, node.dtype = dtype.logical_shape(array.shape), dtype
        node.buffer, node.writable = array, writable
        return node

    @property
    def realized(self) -> bool:
        return self.buffer is not None

    def become_buffer(self, array, writable: bool):
        self.op, self.srcs, self.arg, self.buffer, self.writable = "buffer", (), None, array, writable

    def __repr__(self):
        return f"Node({self.op}, {self.shape}, {self.dtype.name})"


# A graph (networkx DiGraph) has an edge src -> node for each distinct source in node.srcs.
# These two functions are the only way the passes change that, so the two never disagree.

def add_node(g, node: Node) -> Node:
    """Put a new node into the graph, read from its sources."""
    g.add_edges_from((src, node) for src in node.srcs)
    return node


def set_node(g, node: Node, op: str, srcs, arg) -> list[Node]:
    """Make node compute op(srcs, arg) in place, so that whoever reads it or asked for it still
    gets it, and move its edges along. Returns the sources it no longer reads."""
    srcs = tuple(srcs)
    dropped = [src for src in dict.fromkeys(node.srcs) if src not in srcs]
    for src in dict.fromkeys(node.srcs):
        if g.has_edge(src, node):
            g.remove_edge(src, node)
    node.op, node.srcs, node.arg = op, srcs, arg
    add_node(g, node)
    return dropped
