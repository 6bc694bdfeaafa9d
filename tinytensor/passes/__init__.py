"""Graph-to-graph rewrites run on every schedule before any backend sees it, so all backends
run the same kernels. Each pass is a function (graph, outputs) -> None that rewrites the graph
in place without changing what any output computes.

TT_PASSES picks them: unset or "all" runs every pass, "none" runs none, or a comma list of names.
"""
import os

from tinytensor.passes.fold_matmul_casts import fold_matmul_casts
from tinytensor.passes.fuse_attention import fuse_attention
from tinytensor.passes.fuse_elementwise import fuse_elementwise
from tinytensor.passes.fuse_linear import fuse_linear

PASSES = {  # in the order they run: the pattern matchers see the ops as recorded
    "fold_matmul_casts": fold_matmul_casts,
    "fuse_attention": fuse_attention,
    "fuse_linear": fuse_linear,
    "fuse_elementwise": fuse_elementwise,
}


def enabled() -> list[str]:
    chosen = os.environ.get("TT_PASSES", "all").strip()
    if chosen in ("", "all"):
        return list(PASSES)
    if chosen == "none":
        return []
    names = [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown} in TT_PASSES; known: {', '.join(PASSES)}, all, none")
    return names


def run_passes(g, outputs) -> None:
    for name in enabled():
        PASSES[name](g, outputs)
