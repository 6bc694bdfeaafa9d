"""A small tour of tinytensor: record a computation lazily, look at its schedule, run it.
`python -m tools.demo` (add TT_DEBUG=1 to see each scheduled op)."""
import numpy as np

from tinytensor import Tensor, graph, nn


def main():
    x = Tensor.randn(4, 8, seed=0)
    w = Tensor.randn(16, 8, seed=1)
    cache = Tensor.zeros(6, 16).contiguous().realize()      # a buffer written in place
    h = nn.linear(nn.rms_norm(x), w).silu()                  # recorded, not yet computed
    cache[1:5] = h
    scores = nn.softmax(cache @ cache.T)
    schedule, _ = graph.plan([scores.node])
    print(f"recorded {len(schedule.nodes)} ops; nothing has run yet")
    print(graph.describe(schedule))
    out = scores.numpy()
    print("row sums of the softmax (all 1):", np.round(out.sum(-1), 6))


if __name__ == "__main__":
    main()
