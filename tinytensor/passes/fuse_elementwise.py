"""Fuse chains of elementwise ops into one kernel, and let a reduction absorb the chain that
feeds it.

Walking from the outputs back, an elementwise node joins its consumer's kernel when that kernel
is its only reader, it has the same shape, and it is not itself an output. Constants of the
kernel's shape are inlined into every kernel that reads them. A kernel's root node is rewritten
in place into a `fused` (or `fused_reduce`) node whose arg is the program of its members.
"""
import networkx as nx

from ops.elementwise import ELEMENTWISE
from ops.fused import Fused, FusedReduce, Instruction
from ops.reduce import REDUCE
from tinytensor.node import set_node


def _joins(node, consumers, kernel_of, outputs) -> object:
    """The kernel (its root) that node joins, or None."""
    kernels = {kernel_of.get(c) for c in consumers}
    if node in outputs or len(kernels) != 1 or None in kernels:
        return None
    root = kernels.pop()
    shape = root.srcs[0].shape if root.op in REDUCE else root.shape
    return root if node.shape == shape else None


def fuse_elementwise(g: nx.DiGraph, outputs) -> None:
    outputs, kernel_of = set(outputs), {}
    for node in reversed(list(nx.topological_sort(g))):
        if node.realized:
            continue
        if node.op in REDUCE:
            kernel_of[node] = node
        elif any(s.dtype.block for s in node.srcs):
            continue  # a block type's cast dequantises on its own (ops/blocks/); nothing joins it
        elif node.op in ELEMENTWISE:
            kernel_of[node] = _joins(node, list(g.successors(node)), kernel_of, outputs) or node
    members: dict = {}
    for node, root in kernel_of.items():
        members.setdefault(root, []).append(node)
    for root, nodes in members.items():
        if len(nodes) > 1 or any(_inlinable(s, root) for n in nodes for s in n.srcs):
            _rewrite(g, root, [n for n in nx.topological_sort(g.subgraph(nodes))])


def _inlinable(src, root) -> bool:
    shape = root.srcs[0].shape if root.op in REDUCE else root.shape
    return src.op == "const" and not src.realized and src.shape == shape


def _rewrite(g, root, members):
    """Turn root into one node computing all members from their outside inputs."""
    body = [n for n in members if n is not root] + ([] if root.op in REDUCE else [root])
    inputs, index, program = [], {}, []
    for node in body:
        operands = []
        for src in node.srcs:
            if src in index:
                operands.append(index[src])
            elif _inlinable(src, root):
                program.append(Instruction("const", src.arg, (), src.dtype))
                index[src] = -len(program)  # patched below, once the input count is known
                operands.append(index[src])
            else:
                index[src] = len(inputs)
                inputs.append(src)
                operands.append(index[src])
        program.append(Instruction(node.op, node.arg, tuple(operands), node.dtype))
        index[node] = -len(program)
    n_in = len(inputs)
    program = tuple(Instruction(op, arg, tuple(o if o >= 0 else n_in + (-o - 1) for o in operands), dt)
                    for op, arg, operands, dt in program)
    if not inputs:
        return  # constants only: nothing worth a kernel
    in_types = tuple(s.dtype for s in inputs)
    if root.op in REDUCE:
        source = root.srcs[0]
        if source not in index:  # the reduction reads a view or a buffer directly
            return
        arg = FusedReduce(root.op, root.arg, in_types, program)
        op = "fused_reduce"
    else:
        op, arg = "fused", Fused(in_types, program)
    g.remove_nodes_from([n for n in members if n is not root])
    set_node(g, root, op, inputs, arg)
    g.remove_nodes_from([c for c in index if c in g and c.op == "const" and g.out_degree(c) == 0])
