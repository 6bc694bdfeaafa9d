"""What the pattern-matching passes share: looking through broadcasts, reading constants, and
rewriting a matched group of nodes into one."""
from tinytensor.node import set_node


def under(node, ops=("expand",)):
    """The node below any chain of the given view ops."""
    while node.op in ops:
        node = node.srcs[0]
    return node


def const_value(node):
    """The scalar a constant node fills its shape with, or None."""
    return node.arg[0] if node.op == "const" and not node.realized else None


def only_for(g, node, readers, outputs) -> bool:
    """node is read by `readers` and nothing else, and is not asked for: fusing it away into
    them loses nothing."""
    return node in g and node not in outputs and not node.realized and set(g.successors(node)) == set(readers)


def rewrite(g, root, op, srcs, arg, absorbed, outputs):
    """Make root compute op(srcs, arg) in place (so whoever reads or asked for root still gets
    it), drop the absorbed nodes, then whatever nothing reads any more."""
    detached = list(root.srcs) + [s for n in absorbed for s in n.srcs]
    g.remove_nodes_from(absorbed)
    set_node(g, root, op, srcs, arg)
    remove_unread(g, detached, outputs)


def remove_unread(g, nodes, outputs):
    """Remove the given nodes if nothing reads them, and so on back through their sources."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in g and g.out_degree(node) == 0 and node not in outputs and not node.realized:
            stack.extend(g.predecessors(node))
            g.remove_node(node)
