"""Elementwise ops. The inputs of a binary or ternary op already share one shape and one dtype:
the Tensor layer makes broadcasting (`expand`) and promotion (`cast`) explicit, so a backend
never has to guess either."""
import numpy as np

from ops import dtypes
from ops.registry import define, shape_str


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))  # exact in both tails, no overflow


def erf(x):
    """The error function in float64, as NumPy has none: 2/sqrt(pi) exp(-x^2) sum 2^n x^(2n+1) /
    (1 3 5 ... (2n+1)), a series of positive terms (no cancellation: ~1e-16 relative) which 100
    terms carry to |x| = 6; beyond it erf is +-1 to float64's precision."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), 6.0)
    term = a.copy()
    total = a.copy()
    for n in range(1, 100):
        term = term * (2.0 * a * a) / (2 * n + 1)
        total += term
    return np.sign(x) * np.minimum(total * np.exp(-a * a) * (2.0 / np.sqrt(np.pi)), 1.0)


def _gelu(x):
    """GELU as PyTorch's default (approximate='none'): x * Phi(x), with the exact erf."""
    return x * 0.5 * (1.0 + erf(np.asarray(x, dtype=np.float64) * np.sqrt(0.5)))


UNARY = {
    "neg": np.negative,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "sin": np.sin,
    "cos": np.cos,
    "tanh": np.tanh,
    "abs": np.abs,
    "relu": lambda x: np.maximum(x, 0),
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "gelu": _gelu,
}
FLOAT_ONLY = {"exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "silu", "gelu", "div", "pow"}

BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.true_divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
}

COMPARE = {
    "cmplt": np.less,
    "cmple": np.less_equal,
    "cmpgt": np.greater,
    "cmpge": np.greater_equal,
    "cmpeq": np.equal,
    "cmpne": np.not_equal,
}

# Every op computed value by value: what the fusion passes chain and a loop kernel runs.
ELEMENTWISE = frozenset(UNARY) | frozenset(BINARY) | frozenset(COMPARE) | {"where", "cast"}


def _check_same(name, srcs):
    shapes, types = [s.shape for s in srcs], [s.dtype for s in srcs]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"{name}: operand shapes {shape_str(*shapes)} differ (expand them first)")
    if any(t != types[0] for t in types):
        raise ValueError(f"{name}: operand dtypes {types} differ (cast them first)")
    if name in FLOAT_ONLY and not types[0].is_float:
        raise ValueError(f"{name}: needs a float operand, got {types[0]} (cast it first)")
    return shapes[0], types[0]


def _elementwise_infer(name):
    def infer(srcs, arg):
        shape, dtype = _check_same(name, srcs)
        return shape, dtypes.bool_ if name in COMPARE else dtype
    return infer


def _where_infer(srcs, arg):
    cond, x, y = srcs
    if cond.dtype != dtypes.bool_:
        raise ValueError(f"where: condition must be bool, got {cond.dtype}")
    if cond.shape != x.shape:
        raise ValueError(f"where: condition shape {cond.shape} differs from {x.shape}")
    return _check_same("where", (x, y))


for _name, _fn in {**UNARY, **BINARY, **COMPARE}.items():
    define(_name, _elementwise_infer(_name), lambda xs, arg, shape, dtype, fn=_fn: fn(*xs))

define("where", _where_infer, lambda xs, arg, shape, dtype: np.where(*xs))

# cast: widening, then rounding to the target dtype, is the whole meaning (float -> int truncates)
define("cast", lambda srcs, arg: (srcs[0].shape, arg), lambda xs, arg, shape, dtype: xs[0])
