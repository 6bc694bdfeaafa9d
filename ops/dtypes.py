"""The element types a tensor can hold, how they promote, and how they are stored.

float16 and bfloat16 are storage types: every op widens them to float32, computes, and rounds
the result back. NumPy has no bfloat16, so its bits live in uint16 (the upper half of a float32),
exactly as checkpoints store them.

Block types (q8_0, q4_0, ... see ops/blocks/) hold a GGUF file's bytes: a tensor of logical
shape [..., K] is stored as uint8 [..., K / values * block_bytes] (32 or 256 values a block).
They are weights: they can be read by rows (gather), multiplied (x @ W.T) and cast to a float
type, which is their meaning (dequantisation).
"""
from dataclasses import dataclass

import numpy as np

from ops import blocks


@dataclass(frozen=True, slots=True)  # shared singletons: nothing may change one (not even pickle's BUILD)
class DType:
    name: str
    storage: np.dtype   # how the bits are held in a NumPy buffer
    rank: int           # position in the promotion order
    is_float: bool
    block: object = None  # a block type's ops.blocks.Format

    def storage_shape(self, shape) -> tuple[int, ...]:
        """The shape of the buffer holding a tensor of this dtype and logical shape."""
        if self.block is None:
            return tuple(shape)
        return (*shape[:-1], shape[-1] // self.block.values * self.block.block_bytes)

    def logical_shape(self, storage_shape) -> tuple[int, ...]:
        if self.block is None:
            return tuple(storage_shape)
        return (*storage_shape[:-1], storage_shape[-1] // self.block.block_bytes * self.block.values)

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    def __repr__(self):
        return f"dtypes.{self.name}"


bool_ = DType("bool", np.dtype(np.bool_), 0, False)
int8 = DType("int8", np.dtype(np.int8), 1, False)
int32 = DType("int32", np.dtype(np.int32), 2, False)
int64 = DType("int64", np.dtype(np.int64), 3, False)
float16 = DType("float16", np.dtype(np.float16), 4, True)
bfloat16 = DType("bfloat16", np.dtype(np.uint16), 4, True)
float32 = DType("float32", np.dtype(np.float32), 5, True)

ALL = (bool_, int8, int32, int64, float16, bfloat16, float32)
BLOCKS = tuple(DType(f.name, np.dtype(np.uint8), 4, True, f) for f in blocks.FORMATS.values())
BY_NAME = {d.name: d for d in ALL + BLOCKS}
# by name, not by position: reordering ops.blocks.FORMATS must not rename a type
q8_0, q4_0, q4_1, q5_0, q5_1 = (BY_NAME[n] for n in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"))
q4_k, q5_k, q6_k = (BY_NAME[n] for n in ("q4_k", "q5_k", "q6_k"))
BY_GGML_TYPE = {d.block.ggml_type: d for d in BLOCKS}  # a GGUF tensor's type id -> its block dtype
default_float = float32
default_int = int64


def promote(a: DType, b: DType) -> DType:
    """The dtype of a binary op's result: the wider type; float16 with bfloat16 meets in float32."""
    if a == b:
        return a
    if a.rank == b.rank:  # float16 and bfloat16: neither holds the other
        return float32
    return a if a.rank > b.rank else b


def from_numpy_dtype(dt: np.dtype) -> DType:
    """The dtype a NumPy array becomes: float64 narrows to float32, as in PyTorch's defaults."""
    dt = np.dtype(dt)
    if dt == np.float64:
        return float32
    if dt in (np.uint8, np.int16, np.uint16):
        return int32
    for d in ALL:
        if d is not bfloat16 and d.storage == dt:
            return d
    raise TypeError(f"NumPy dtype {dt} has no tinytensor dtype; cast it to one of "
                    f"{', '.join(BY_NAME)} first")


def to_dtype(d) -> DType:
    """Accept a DType, its name ('bfloat16'), or a NumPy dtype."""
    if isinstance(d, DType):
        return d
    if isinstance(d, str) and d in BY_NAME:
        return BY_NAME[d]
    if isinstance(d, str):
        raise TypeError(f"unknown dtype {d!r}; known: {', '.join(BY_NAME)}")
    return from_numpy_dtype(d)


# ---- storage <-> compute ------------------------------------------------------------------

def widen(x: np.ndarray, d: DType) -> np.ndarray:
    """Storage bits of dtype d -> the array ops compute on (float32 for the half types)."""
    if d is bfloat16:
        return (x.astype(np.uint32) << 16).view(np.float32)
    if d is float16:
        return x.astype(np.float32)
    if d.block is not None:
        return blocks.dequantize(x, d.block)
    return x


NARROW_CHUNK = 1 << 20


def narrow(x: np.ndarray, d: DType) -> np.ndarray:
    """A computed array -> storage bits of dtype d (round to nearest even for bfloat16)."""
    assert d.block is None, "no op computes a block type"
    if d is bfloat16:
        # in chunks, so rounding a 1 GB tensor needs no whole-tensor temporaries
        values = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        out = np.empty(np.shape(x), np.uint16)
        for start in range(0, values.size, NARROW_CHUNK):
            part = values[start:start + NARROW_CHUNK]
            bits = part.view(np.uint32)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            # NaN must stay NaN: rounding could carry it into infinity.
            out.reshape(-1)[start:start + NARROW_CHUNK] = np.where(np.isnan(part), (bits >> 16) | 0x40, rounded)
        return out
    if x.dtype == d.storage:
        return x
    if d is bool_:
        return x != 0
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(d.storage)


CONVERT_ROWS = 4096  # rows converted at once: bounds the float32 temporary of a big matrix


def convert(x: np.ndarray, source: DType, target: DType) -> np.ndarray:
    """Storage bits of `source` -> storage bits of `target` (float or block types), through
    float32 a few thousand rows at a time, so converting a 2 GB embedding never holds it as
    float32. The same dtype gives x itself (a memory-mapped file's bytes stay mapped)."""
    if source == target:
        return x
    out = np.empty(target.storage_shape(source.logical_shape(x.shape)), target.storage)
    for start in range(0, max(len(x), 1), CONVERT_ROWS):
        values = widen(np.asarray(x[start:start + CONVERT_ROWS]), source).astype(np.float32, copy=False)
        out[start:start + CONVERT_ROWS] = target.block.quantize(values) if target.block \
            else narrow(values, target)
    return out
