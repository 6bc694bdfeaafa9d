"""A weight stored as bfloat16 or float16 reaches a matmul as cast(weight) -> float32, through
views (transpose, expand). Left alone, that cast converts the whole weight on every call. This
pass moves the views onto the stored weight and lets the matmul read it as it is: the product's
meaning is unchanged (the kernel widens each element in registers, which is all the cast did).
Block-quantised weights are not cast: x @ W.T reads them as stored (Tensor.matmul), with its own
meaning (ops.blocks.product)."""
import networkx as nx

from ops import dtypes
from ops.movement import VIEWS
from tinytensor.node import Node, add_node, set_node
from tinytensor.passes.patterns import remove_unread


def _stored_source(node):
    """The views from node down to a cast from a half type, or None."""
    views = []
    while node.op in VIEWS:
        views.append(node)
        node = node.srcs[0]
    stored = node.srcs[0].dtype if node.op == "cast" else None
    if node.dtype == dtypes.float32 and stored in (dtypes.float16, dtypes.bfloat16):
        return node, views
    return None


def fold_matmul_casts(g: nx.DiGraph, outputs) -> None:
    detached = []
    for mm in [n for n in g if n.op == "matmul" and n.dtype == dtypes.float32 and n.arg is None]:
        srcs = list(mm.srcs)
        for i, src in enumerate(srcs):
            found = _stored_source(src)
            if found is None:
                continue
            cast, views = found
            node = cast.srcs[0]
            for view in reversed(views):
                node = add_node(g, Node(view.op, (node,), view.arg))
            srcs[i] = node
        if srcs != list(mm.srcs):
            detached += set_node(g, mm, "matmul", srcs, dtypes.float32)
    remove_unread(g, detached, set(outputs))  # the casts and views nothing reads any more
