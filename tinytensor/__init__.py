"""tinytensor: a small lazy tensor framework. Ops record a graph; a backend runs it when a
value is asked for. `TT_BACKEND` picks the backend, `TT_DEBUG=1` prints what runs."""
from ops import dtypes  # noqa: F401  (the public home of dtypes is tinytensor.dtypes)
from tinytensor.tensor import Tensor  # noqa: F401
from tinytensor import nn  # noqa: F401
from backends import use as use_backend  # noqa: F401
