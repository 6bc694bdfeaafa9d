"""What the op tests compare against: direct NumPy computations in float64, tolerances that
follow from each dtype, and strategies for shapes and values."""
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ops import dtypes
from tinytensor import Tensor

FLOATS = [dtypes.float32, dtypes.float16, dtypes.bfloat16]
INTS = [dtypes.int8, dtypes.int32, dtypes.int64]

# Results are computed in float32 and rounded once to the storage dtype; the reference is
# float64. So a half-precision result is off by at most half a unit in its last place plus the
# float32 slop: one epsilon of the dtype bounds it (float16 2^-10, bfloat16 2^-7). float32 results
# carry the few-ulp error of vectorised exp/log/sin (NumPy's own SIMD kernels): 1e-5 covers it.
RTOL = {dtypes.float32: 1e-5, dtypes.float16: 2.0**-10, dtypes.bfloat16: 2.0**-7}
# Near zero a relative bound means nothing: allow one epsilon of float32 arithmetic on O(1) values,
# or the dtype's epsilon on O(1) values for the half types (a result that cancels to ~0).
ATOL = {dtypes.float32: 1e-6, dtypes.float16: 2.0**-10, dtypes.bfloat16: 2.0**-7}


def values(t: Tensor) -> np.ndarray:
    """What a tensor holds, as NumPy values (float64 for floats) for reference computations."""
    out = t.numpy()
    return out.astype(np.float64) if t.dtype.is_float else out


def summation_error(terms: int, magnitude: float) -> float:
    """The classic float32 bound for a sum of `terms` values whose absolute values add up to
    `magnitude`: terms * 2^-24 * magnitude."""
    return terms * 2.0**-24 * magnitude


def assert_close(got: Tensor, want: np.ndarray, dtype=None, roundings=1, atol=0.0):
    """`roundings`: how many times the result was rounded to its dtype on the way (each costs one
    epsilon); `atol`: extra absolute error a computation may carry, e.g. `summation_error`."""
    dtype = dtype or got.dtype
    want = np.asarray(want)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    g = got.numpy()
    if not dtype.is_float:
        np.testing.assert_array_equal(g, want)
        return
    with np.errstate(over="ignore"):  # beyond the dtype's range the right answer is inf
        want = want.astype(np.float16 if dtype == dtypes.float16 else np.float32).astype(np.float64)
    np.testing.assert_allclose(g.astype(np.float64), want, rtol=RTOL[dtype] * roundings,
                               atol=ATOL[dtype] * roundings + atol, equal_nan=True)


def shapes(min_dims=0, max_dims=4, min_side=0, max_side=5):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def float_arrays(shape, low=-8.0, high=8.0):
    low, high = float(np.float32(low)), float(np.float32(high))  # bounds exact in float32
    return hnp.arrays(np.float32, shape, elements=st.floats(low, high, width=32))


def int_arrays(shape, dtype, low=-100, high=100):
    return hnp.arrays(dtype.storage, shape, elements=st.integers(low, high))


@st.composite
def tensors(draw, dtype_choices=FLOATS, shape=None, low=-8.0, high=8.0):
    """A tensor of a drawn float or int dtype; floats are rounded to the dtype first."""
    dtype = draw(st.sampled_from(dtype_choices))
    shape = draw(shapes()) if shape is None else shape
    if dtype.is_float:
        return Tensor(draw(float_arrays(shape, low, high)), dtype=dtype)
    return Tensor(draw(int_arrays(shape, dtype, int(low), int(high))), dtype=dtype)


# A product with block-quantised weights meets its input rounded to 8 bits with one scale per
# group of `group` values, the weights' block (ops.blocks.quantize_rows: 32, or 256 for the
# K-quants): each value moves by at most half a step d = amax / 127, and as noise that spreads
# evenly over the step its mean square is d^2 / 12. Since amax^2 <= the group's sum of squares
# (`group` mean squares), one product's relative mean-square error is at most
# group / (12 * 127^2); per 32 values the scale is stored as float16, which moves every value
# of the block by 2^-11 of it at most, (2^-11)^2 more. Noise from the products on a logit's
# path adds (to first order).
def q8_nmse_per_product(group: int) -> float:
    return group / (12 * 127 ** 2) + (2.0 ** -22 if group == 32 else 0.0)


def quantised_products_on_path(n_layers: int) -> int:
    """The 8-bit products a logit passes through: Q/K/V, the output projection, gate/up and
    down in every layer, then the head."""
    return 4 * n_layers + 1


def nmse(got: np.ndarray, want: np.ndarray) -> float:
    """Normalised mean squared error, the measure llama.cpp's backend tests use for quantised
    products."""
    want = want.astype(np.float64)
    return float(np.mean((got - want) ** 2) / np.mean(want ** 2))


def words(n: int, seed: int = 0) -> str:
    """n common English words drawn at random: a text any tokenizer splits into about n tokens."""
    rng = random.Random(seed)
    vocabulary = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def perplexities(gguf: Path, text: Path, llamacpp_bin: Path, context: int, chunks: int | None = None):
    """((ppl, error) of tools.perplexity, (ppl, error) of llama-perplexity) on the same file and
    text: the two final estimates that are to agree."""
    limit = ["--chunks", str(chunks)] if chunks else []
    ours = subprocess.run([sys.executable, "-m", "tools.perplexity", "--checkpoint", str(gguf), "--file", str(text),
                           "--context", str(context), *limit], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    theirs = subprocess.run([str(llamacpp_bin / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c",
                             str(context), *limit, "-t", "2"], capture_output=True, text=True)
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr[-2000:]
    final = r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)"
    return tuple(tuple(map(float, re.search(final, out).groups())) for out in (ours.stdout, theirs.stdout + theirs.stderr))
