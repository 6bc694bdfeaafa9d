"""The lazy graph: a node per recorded op, and the plan that turns the nodes a result needs into
an ordered list of work for a backend.

    record (Node) -> build_graph -> share_common_subexpressions -> remove_dead -> order -> Schedule
"""
from dataclasses import dataclass, field

import networkx as nx

from tinytensor.node import Node, add_node, set_node
from tinytensor.passes import run_passes


WRITES = ("assign", "assign_at")  # the ops that write into their first input's buffer


@dataclass
class Schedule:
    """Work for a backend: compute `nodes` in order; `outputs` are the results asked for;
    an assign node in `in_place` writes into its target's buffer instead of a copy."""
    nodes: list[Node]
    outputs: list[Node]
    in_place: set[Node] = field(default_factory=set)


def build_graph(outputs) -> nx.DiGraph:
    """Everything the outputs need that is not realised yet, plus the buffers it reads.
    Nodes nothing asked for never enter, so dead code costs nothing."""
    g, seen = nx.DiGraph(), set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        g.add_node(node)
        add_node(g, node)
        stack.extend(node.srcs)
    return g


def _key(node: Node):
    if node.op in ("buffer", "empty"):  # distinct storage, even when alike
        return node
    return node.op, node.arg, node.shape, node.dtype, node.srcs


def share_common_subexpressions(g: nx.DiGraph) -> dict[Node, Node]:
    """Make every node read the one canonical copy of each repeated computation.
    Returns node -> canonical node; the duplicates are left with no consumers."""
    canonical, by_key = {}, {}
    for node in list(nx.topological_sort(g)):
        if any(canonical[s] is not s for s in node.srcs):
            set_node(g, node, node.op, (canonical[s] for s in node.srcs), node.arg)
        canonical[node] = by_key.setdefault(_key(node), node)
    return canonical


def remove_dead(g: nx.DiGraph, outputs) -> None:
    """Drop what no output needs (the duplicates CSE left behind): one walk back from all outputs."""
    keep, stack = set(), list(outputs)
    while stack:
        node = stack.pop()
        if node not in keep:
            keep.add(node)
            stack.extend(g.predecessors(node))
    g.remove_nodes_from([n for n in list(g) if n not in keep])


def plan_writes(g: nx.DiGraph) -> set[Node]:
    """Decide which assigns write into their target's buffer. That is allowed when the buffer
    belongs to the target alone and every other reader of it can run before the write."""
    in_place = set()
    for node in [n for n in g if n.op in WRITES]:
        target = node.srcs[0]
        if not (target.realized and target.writable):
            continue
        readers = [r for r in g.successors(target) if r is not node]
        if any(nx.has_path(g, node, r) for r in readers):
            continue  # something reads both the old and the new value: write into a copy
        g.add_edges_from((r, node) for r in readers)  # order only (not a source): the one edge not from srcs
        in_place.add(node)
    return in_place


def plan(outputs) -> tuple[Schedule, dict[Node, Node]]:
    """The schedule that computes `outputs` (unrealised nodes), and {node: canonical node} for
    every node that becomes a buffer: the outputs, and every write on the way (a write is a side
    effect: once done, later graphs must read its result, not redo it)."""
    g = build_graph(outputs)
    outputs = list(dict.fromkeys([*outputs, *(n for n in g if n.op in WRITES)]))
    canonical = share_common_subexpressions(g)
    targets = list(dict.fromkeys(canonical[n] for n in outputs))
    remove_dead(g, targets)
    run_passes(g, targets)
    in_place = plan_writes(g)
    order = [n for n in nx.topological_sort(g) if not n.realized]
    return Schedule(order, targets, in_place), {n: canonical[n] for n in outputs}


def describe(schedule: Schedule) -> str:
    """One line per scheduled op, for TT_DEBUG=1."""
    index = {n: i for i, n in enumerate(schedule.nodes)}
    lines = []
    for i, n in enumerate(schedule.nodes):
        srcs = ", ".join(f"%{index[s]}" if s in index else f"buf{tuple(s.shape)}" for s in n.srcs)
        if n.op == "fused":
            arg = " [" + " ".join(i.op for i in n.arg.program) + "]"
        elif n.op == "fused_reduce":
            arg = f" {n.arg.reduce}{n.arg.axes} of [" + " ".join(i.op for i in n.arg.program) + "]"
        else:
            arg = "" if n.arg is None else f" {n.arg}"
        mark = " (in place)" if n in schedule.in_place else ""
        lines.append(f"  %{i:<4} {n.op:<12} {str(n.shape):<18} {n.dtype.name:<8} <- {srcs}{arg}{mark}")
    return "\n".join(lines)
