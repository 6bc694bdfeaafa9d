"""Fuse softmax(q @ k^T * scale + mask) @ v, as nn.scaled_dot_product_attention records it, into
one `attention` kernel (see ops.linear), so that no backend has to hold the score matrix: the
LLVM kernel runs an online softmax over blocks of keys.

The pattern, on the ops recorded (before elementwise fusion):
    scores = matmul(q, k^T) * scale, then where(mask, scores, -inf) or scores + mask
    e = exp(scores - max(scores)); out = matmul(e / sum(e), v)
k^T may be any view whose last two axes are k's; the kernel gets k itself as a view.
"""
import math

import networkx as nx

from ops import dtypes
from ops.linear import Attention
from tinytensor.node import Node, add_node
from tinytensor.passes.patterns import const_value, rewrite, under


def _reduced_last(node, op, src):
    last = (len(src.shape) - 1,)
    return node.op == op and node.arg == last and node.srcs[0] is src


def _scaled_scores(node):
    """(the matmul q @ k^T, scale) when node is matmul(q, k^T) * scale, else None."""
    if node.op != "mul":
        return None
    for mm, c in (node.srcs, node.srcs[::-1]):
        if mm.op == "matmul" and const_value(c) is not None and mm.dtype == dtypes.float32:
            return mm, float(const_value(c))
    return None


def _masked(x):
    """(scaled scores node, mask node or None, mask kind) for the scores softmax reads."""
    if x.op == "where" and const_value(x.srcs[2]) == -math.inf and _scaled_scores(x.srcs[1]):
        return x.srcs[1], x.srcs[0], "bool"
    if x.op == "add":
        for scores, mask in (x.srcs, x.srcs[::-1]):
            if _scaled_scores(scores) and mask.dtype == dtypes.float32:
                return scores, mask, "add"
    if _scaled_scores(x):
        return x, None, None
    return None


def _views(node, end) -> list:
    """The broadcasts from node down to end, end included."""
    chain = [node]
    while chain[-1] is not end:
        chain.append(chain[-1].srcs[0])
    return chain


def _match(g, out, outputs):
    """(srcs, arg, absorbed nodes) when out is attention's final product, else None."""
    if out.op != "matmul" or out.dtype != dtypes.float32 or out.srcs[0].op != "div" or len(out.shape) < 2:
        return None
    p, v = out.srcs
    e, total = p.srcs[0], under(p.srcs[1])
    if e.op != "exp" or not _reduced_last(total, "sum", e) or e.srcs[0].op != "sub":
        return None
    x, peak = e.srcs[0].srcs[0], under(e.srcs[0].srcs[1])
    masked = _masked(x)
    if not _reduced_last(peak, "max", x) or masked is None:
        return None
    scores, mask, kind = masked
    qk, scale = _scaled_scores(scores)
    q, kt = qk.srcs
    srcs = [q, kt, v] + ([mask] if mask is not None else [])
    if any(s.dtype != dtypes.float32 for s in srcs[:3]) or (kind == "bool" and mask.dtype != dtypes.bool_):
        return None
    # everything from q @ k^T to the output becomes the kernel: none of it may be read elsewhere
    absorbed = {p, e, e.srcs[0], x, scores, qk, *_views(p.srcs[1], total), *_views(e.srcs[0].srcs[1], peak)}
    inside = absorbed | {out}
    if any(s in absorbed for s in srcs) or any(n in outputs or n.realized or not set(g.successors(n)) <= inside
                                               for n in absorbed):
        return None
    return srcs, Attention(scale, kind), list(absorbed)


def fuse_attention(g: nx.DiGraph, outputs) -> None:
    outputs = set(outputs)
    for out in [n for n in g if n.op == "matmul"]:
        found = _match(g, out, outputs) if out in g else None
        if found is None:
            continue
        srcs, arg, absorbed = found
        rank = len(srcs[1].shape)  # the kernel reads k itself: a view swapping k^T's last two axes
        srcs[1] = add_node(g, Node("permute", (srcs[1],), tuple(range(rank - 2)) + (rank - 1, rank - 2)))
        rewrite(g, out, "attention", srcs, arg, absorbed, outputs)
