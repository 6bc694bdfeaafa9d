"""Fuse what surrounds a linear layer (x @ W.T with a stored [out, in] weight) into one
`fused_linear` kernel (see ops.linear):

- RMSNorm before it: rms_norm(x) * g feeding the product becomes the kernel's prologue;
- SwiGLU after it: silu(x @ Wg.T) * (x @ Wu.T) becomes one kernel over both weights;
- a residual add after it: r + x @ W.T adds r as each output element is stored (a bias too),
  and a GELU after that add applies to each element then;
- linear layers of one input with nothing after them (Q, K and V) become one kernel whose output
  holds theirs side by side; each becomes a view of its columns.

Patterns are matched on the ops nn.rms_norm and the model record, before elementwise fusion.
A node is absorbed only when the fused kernel is its one reader and nobody asked for it.
"""
import networkx as nx

from ops import dtypes
from ops.fused import Instruction
from ops.linear import Linear
from tinytensor.node import Node, add_node, set_node
from tinytensor.passes.patterns import const_value, only_for, rewrite, under

F32 = dtypes.float32
EPILOGUE_ACTIVATIONS = ("gelu",)  # applied to each output element after the residual or bias add


def _weight(b):
    """The stored [n, k] weight when a matmul operand is its transpose, else None."""
    if b.op == "permute" and b.arg == (1, 0) and b.srcs[0].dtype.is_float:
        return b.srcs[0]
    return None


def _input_as(weight_dtype):
    """How a product with weights of this dtype reads its input: None for float weights, else
    the block size its 8-bit values are scaled by (ops.blocks.product)."""
    return weight_dtype.block.values if weight_dtype.block else None


def _linear(node):
    """(input, weight) when node is a float32 x @ W.T over 2-D operands, else None."""
    if node.op != "matmul" or len(node.shape) != 2 or node.dtype != F32 or node.srcs[0].dtype != F32:
        return None
    w = _weight(node.srcs[1])
    return (node.srcs[0], w) if w is not None else None


def _rms_norm(a):
    """(x, g, eps) when a is nn.rms_norm(x, g, eps) of a float32 x, else None: the graph
    x * rsqrt(sum(x * x) / k + eps) * g, g broadcast along the rows (and maybe widened)."""
    if a.op != "mul":
        return None
    for normed, scaled in (a.srcs, a.srcs[::-1]):
        g = under(scaled, ("expand", "reshape"))
        if g.op == "cast" and g.srcs[0].dtype.is_float:
            g = g.srcs[0]
        if g.shape != a.shape[-1:] or normed.op != "mul":
            continue
        x, r = normed.srcs[0], under(normed.srcs[1])
        if r.op != "rsqrt" or r.srcs[0].op != "add":
            continue
        mean, eps = r.srcs[0].srcs
        if mean.op != "div" or const_value(eps) is None:
            continue
        total, count = mean.srcs
        if total.op == "sum" and total.arg == (1,) and const_value(count) == x.shape[-1] \
                and total.srcs[0].op == "mul" and total.srcs[0].srcs == (x, x) and x.dtype == F32:
            return x, g, float(const_value(eps))
    return None


def _sole_reader(g, node, outputs):
    readers = list(g.successors(node))
    return readers[0] if len(readers) == 1 and only_for(g, node, readers, outputs) else None


def fuse_linear(g: nx.DiGraph, outputs) -> None:
    outputs = set(outputs)
    products = [n for n in g if _linear(n)]
    # a SwiGLU's gate first, so that it takes its up projection along before that is fused alone
    for mm in sorted(products, key=lambda n: not any(r.op == "silu" for r in g.successors(n))):
        if mm not in g or mm.op != "matmul":
            continue  # already absorbed as the up projection of a SwiGLU
        a, w = _linear(mm)
        weights, extras, absorbed, root = [w], [], [], mm
        program = []  # instructions over ("acc", i), ("extra", i) and ("ins", i) operands
        value = ("acc", 0)

        silu = _sole_reader(g, mm, outputs)
        gate = _sole_reader(g, silu, outputs) if silu is not None and silu.op == "silu" else None
        if gate is not None and gate.op == "mul":
            up = gate.srcs[1] if gate.srcs[0] is silu else gate.srcs[0]
            # one kernel reads its input one way for both weights: as floats, or in 8 bits with
            # one scale per block of the same size (ops.blocks.product)
            if _linear(up) and up.srcs[0] is a and _weight(up.srcs[1]).shape == w.shape \
                    and _input_as(_weight(up.srcs[1]).dtype) == _input_as(w.dtype) \
                    and _sole_reader(g, up, outputs) is gate:
                weights.append(_weight(up.srcs[1]))
                program.append(("silu", None, (("acc", 0),), F32))
                pair = (("ins", 0), ("acc", 1)) if gate.srcs[0] is silu else (("acc", 1), ("ins", 0))
                program.append(("mul", None, pair, F32))
                absorbed, root, value = [mm, silu, up], gate, ("ins", 1)

        residual = _sole_reader(g, root, outputs)
        if residual is not None and residual.op == "add" and residual.shape == root.shape:
            other = residual.srcs[1] if residual.srcs[0] is root else residual.srcs[0]
            if other.dtype == F32 and other is not root:
                extras.append(other)
                pair = (value, ("extra", 0)) if residual.srcs[0] is root else (("extra", 0), value)
                program.append(("add", None, pair, F32))
                absorbed, root = absorbed + [root], residual

        activation = _sole_reader(g, root, outputs) if root is residual else None
        if activation is not None and activation.op in EPILOGUE_ACTIVATIONS and activation.dtype == F32:
            program.append((activation.op, None, (("ins", len(program) - 1),), F32))  # of the add's result
            absorbed, root = absorbed + [root], activation

        norm = _rms_norm(a)
        srcs, eps = ([norm[0], norm[1]], norm[2]) if norm else ([a], None)
        srcs += weights + extras
        j = len(weights)
        where = {"acc": 0, "extra": j, "ins": j + len(extras)}
        resolved = tuple(Instruction(op, arg, tuple(where[kind] + i for kind, i in operands), dt)
                         for op, arg, operands, dt in program)
        if not norm and not resolved and not w.dtype.block:
            continue  # a plain product: the matmul kernel is the same kernel (it has none for blocks)
        arg = Linear(eps, j, tuple(s.dtype for s in srcs), resolved)
        rewrite(g, root, "fused_linear", srcs, arg, [n for n in absorbed if n is not root], outputs)
    merge_side_by_side(g, outputs)


def merge_side_by_side(g: nx.DiGraph, outputs) -> None:
    """One kernel for the plain fused linear layers that read the same input (and norm): its
    output is their outputs side by side, and each becomes a view of its columns."""
    groups: dict = {}
    for node in nx.topological_sort(g):
        if node.op == "fused_linear" and node.arg.n_weights == 1 and node.arg.program == ():
            eps = node.arg.eps
            groups.setdefault((eps, node.srcs[:1 if eps is None else 2]), []).append(node)
    for (eps, head), nodes in groups.items():
        if len(nodes) < 2:
            continue
        weights = [n.srcs[-1] for n in nodes]
        merged = Node("fused_linear", head + tuple(weights),
                      Linear(eps, len(weights), tuple(s.dtype for s in head + tuple(weights)), "concat"))
        add_node(g, merged)
        start, rows = 0, nodes[0].shape[0]
        for node in nodes:
            width = node.shape[1]
            set_node(g, node, "shrink", (merged,), ((0, rows, 1), (start, start + width, 1)))
            start += width
