"""Laziness, the graph, the schedule, and the backend registry."""
import numpy as np
import pytest

import backends
from tinytensor import Tensor, graph


@pytest.fixture
def executed(monkeypatch, backend):
    """Every node any backend is asked to compute, in order."""
    ran = []
    real = backends.current().execute

    def spy(schedule):
        ran.extend((n.op, n.arg) for n in schedule.nodes)  # nodes become buffers once realised
        return real(schedule)
    monkeypatch.setattr(backends.current(), "execute", spy)
    return ran


def count(executed, op) -> int:
    """How many times `op` ran, inside fused kernels too."""
    total = 0
    for kind, arg in executed:
        if kind == "fused":
            total += sum(i.op == op for i in arg.program)
        elif kind == "fused_reduce":
            total += sum(i.op == op for i in arg.program) + (arg.reduce == op)
        else:
            total += kind == op
    return total


def test_recording_thousands_of_ops_computes_nothing(executed):
    x = Tensor.ones(16)
    for _ in range(3000):
        x = (x * 1.0001 + 0.5).relu()
    assert executed == []
    assert x.shape == (16,)  # shapes are known without computing
    x.realize()
    assert len(executed) > 0


def test_shared_subgraph_runs_once(executed):
    a = Tensor.randn(8, 8, seed=1)
    shared = (a @ a).exp()
    out = shared + shared * 2
    out.realize()
    assert count(executed, "matmul") == 1
    assert count(executed, "exp") == 1


def test_identical_expressions_recorded_twice_are_merged(executed):
    a = Tensor.randn(4, seed=2)
    (a.sin() + a.sin()).realize()  # two separate sin nodes, one computation
    assert count(executed, "sin") == 1


def test_realized_results_are_reused(executed):
    a = (Tensor.randn(4, 4, seed=3) @ Tensor.randn(4, 4, seed=4)).realize()
    executed.clear()
    (a + 1).realize()
    assert count(executed, "matmul") == 0


def test_only_what_the_result_needs_runs(executed):
    a = Tensor.randn(4, seed=5)
    unused = a.exp()  # recorded, never asked for
    (a + 1).realize()
    assert count(executed, "exp") == 0
    del unused


def test_graph_is_a_networkx_digraph():
    a = Tensor.randn(3, seed=6)
    b = (a + 1) * a
    g = graph.build_graph([b.node])
    assert b.node in g and g.in_degree(b.node) == 2
    schedule, _ = graph.plan([b.node])
    assert schedule.nodes[-1] is b.node and schedule.outputs == [b.node]


def test_debug_prints_the_schedule(capsys, monkeypatch, backend):
    monkeypatch.setenv("TT_DEBUG", "1")
    (Tensor.randn(2, 3, seed=9) @ Tensor.randn(3, 2, seed=10)).realize()
    err = capsys.readouterr().err
    assert "matmul" in err and "(2, 2)" in err and backend in err


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "_chosen", None)  # as in a fresh process: the env var decides
    monkeypatch.setenv("TT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda-please'.*numpy"):
        (Tensor.ones(2) + 1).realize()


def test_errors_raise_when_recorded_not_when_run():
    a = Tensor.ones(2, 3)
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(3, 2\)"):
        a + Tensor.ones(3, 2)


def test_multiple_outputs_realise_together(executed):
    a = Tensor.randn(5, seed=11)
    x, y = a.exp(), a.exp() + 1
    x.realize(y)
    assert count(executed, "exp") == 1
    np.testing.assert_allclose(y.numpy(), x.numpy() + 1, rtol=1e-6)
