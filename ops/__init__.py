"""The op set: each op's shape/dtype rule and its one reference meaning, in NumPy."""
from ops import collective, elementwise, fused, linear, matmul, memory, movement, reduce  # noqa: F401  (they define the ops)
from ops.registry import OPS, OpDef, infer, run_reference  # noqa: F401
