"""GGUF files, read directly (the layout is llama.cpp's `gguf.h`):

    "GGUF" | version u32 (2, 3) | tensor count u64 | key/value count u64
    key/values:   key (u64 length + UTF-8) | value type u32 | value
    tensor infos: name | n_dims u32 | dims u64[n_dims], fastest first | ggml type u32 | offset u64
    padding to `general.alignment` (32), then the tensor data; offsets count from there.

Strings are a u64 length and bytes; arrays an element type u32, a u64 count and the elements.
Every length, count and offset is checked against the file's size before it is used, so a
damaged file gives one CheckpointError, never a hang or a huge allocation. We read it ourselves
rather than with the `gguf` package: its reader builds a NumPy view per array element (13 s for
a 128k-token vocabulary, against 0.3 s here) and trusts the header's counts.

Float tensors and the block types of ops/blocks/ (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
Q6_K) are mapped in place, as stored. Other quantised ones (IQ*, Q2_K, Q3_K, ...) have no kernels
here: they are dequantised at load, with the `gguf` package's reference dequantisation, to
bfloat16 (half the memory of float32; a model of them is then computed as a bf16 one), with a
note saying so.
"""
import math
import mmap
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ops import dtypes
from tinytensor.state import CheckpointError, files, check_no_overlap, progress

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# value type id -> (struct format, size) for the scalar types
SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
           7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
NUMPY_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
FLOATS = {0: (np.float32, dtypes.float32), 1: (np.float16, dtypes.float16), 30: (np.uint16, dtypes.bfloat16)}


class _Cursor:
    """Reads the header from a memory map, refusing any read past the end of the file."""

    def __init__(self, path: Path, buffer: mmap.mmap):
        self.path, self.buffer, self.pos, self.size = path, buffer, 0, len(buffer)

    def fail(self, what: str):
        raise CheckpointError(f"{self.path}: not a valid GGUF file ({what}); it may be truncated or "
                              f"damaged: download it again")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.size - self.pos:
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, past the end of the {self.size}-byte file")
        start, self.pos = self.pos, self.pos + n
        return self.buffer[start:self.pos]

    def scalar(self, kind: int, what: str):
        fmt, size = SCALARS[kind]
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        data = self.take(self.u64(f"{what}'s length"), what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def name(self, what: str) -> str:
        """A key's or tensor's name: a string of printable characters (a damaged byte otherwise;
        the messages that quote a name stay one line)."""
        name = self.string(what)
        if not name.isprintable():
            self.fail(f"{what} {name!r} has control characters")
        return name

    def value(self, kind: int, what: str):
        if kind in SCALARS:
            return self.scalar(kind, what)
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY:
            self.fail(f"{what} has unknown value type {kind}")
        item, count = self.u32(f"{what}'s element type"), self.u64(f"{what}'s length")
        if item in NUMPY_SCALARS:  # numbers: one view, no per-element Python work
            raw = self.take(count * SCALARS[item][1], what)
            values = np.frombuffer(raw, NUMPY_SCALARS[item])
            return (values != 0).tolist() if item == 7 else values.tolist()
        if count > (self.size - self.pos) // 8:  # each element takes at least 8 bytes: refuse before looping
            self.fail(f"{what} claims {count} elements, more than the file can hold")
        if item == STRING:
            return self.strings(count, what)
        return [self.value(item, f"{what}[{i}]") for i in range(count)]

    def strings(self, count: int, what: str) -> list[str]:
        """An array of strings (a vocabulary: 128k tokens, 280k merges), read in one tight loop."""
        data, pos, size, out = self.buffer, self.pos, self.size, []
        try:
            for i in range(count):
                n = int.from_bytes(data[pos:pos + 8], "little") if pos + 8 <= size else -1
                if not 0 <= n <= size - pos - 8:
                    self.pos = pos
                    self.fail(f"{what}[{i}] runs past the end of the file")
                out.append(data[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
        except UnicodeDecodeError:
            self.pos = pos
            self.fail(f"{what}[{len(out)}] is not UTF-8")
        self.pos = pos
        return out


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]   # NumPy order (GGUF lists dims fastest first)
    ggml_type: int
    start: int               # byte range in the file
    end: int


def _parse(path: Path) -> tuple[dict, list[_Tensor], np.ndarray]:
    """(metadata, tensors, the file's bytes, memory-mapped), every field checked against the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = files.regular(path)  # a FIFO would block the open
    try:
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise CheckpointError(f"{path}: cannot be read as a GGUF file ({e})") from None
    cur = _Cursor(path, buffer)
    if cur.take(4, "the magic number") != MAGIC:
        cur.fail("it does not start with 'GGUF'")
    version = cur.u32("the version")
    if version not in (2, 3):
        cur.fail(f"version {version}; versions 2 and 3 are supported")
    n_tensors, n_keys = cur.u64("the tensor count"), cur.u64("the key count")
    metadata = {}
    for k in range(n_keys):
        key = cur.name(f"key {k}")
        metadata[key] = cur.value(cur.u32(f"{key}'s type"), key)
    if n_tensors > (cur.size - cur.pos) // 32:  # a tensor info takes at least 32 bytes
        cur.fail(f"it claims {n_tensors} tensors, more than the file can hold")
    infos = []
    for k in range(n_tensors):
        name = cur.name(f"tensor {k}'s name")
        n_dims = cur.u32(f"{name}'s dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name} has {n_dims} dimensions")
        dims = [cur.u64(f"{name}'s dimensions") for _ in range(n_dims)]
        infos.append((name, dims, cur.u32(f"{name}'s type"), cur.u64(f"{name}'s offset")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        cur.fail(f"general.alignment is {alignment!r}, not a power of two")
    data_start = cur.pos + (-cur.pos % alignment)

    tensors, names = [], set()
    for name, dims, kind, offset in infos:
        if kind not in GGML_QUANT_SIZES:
            cur.fail(f"tensor {name} has unknown type id {kind}")
        if name in names:
            cur.fail(f"tensor {name} appears twice")
        names.add(name)
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        if dims[0] % block:
            cur.fail(f"tensor {name} has rows of {dims[0]} values, not whole blocks of {block}")
        nbytes = math.prod(dims[1:]) * (dims[0] // block) * block_bytes
        if offset % alignment or data_start + offset + nbytes > cur.size:
            cur.fail(f"tensor {name} is misplaced: {nbytes} bytes at offset {offset} (aligned to {alignment}) "
                     f"in a {cur.size}-byte file")
        tensors.append(_Tensor(name, tuple(reversed(dims)), kind, data_start + offset, data_start + offset + nbytes))
    check_no_overlap(path, [(t.start, t.end, t.name) for t in tensors])
    return metadata, tensors, np.frombuffer(buffer, np.uint8)


def read_metadata(path: Path) -> dict:
    return _parse(path)[0]


def read(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, dtypes.DType]]]:
    """(metadata, {name: (array, dtype)}): float tensors and the block types of ops/blocks/
    map the file (a block tensor's array is its bytes, [rows, bytes per row]); others are
    dequantised to bfloat16, with a note on stderr."""
    from gguf import GGMLQuantizationType as Q

    path = Path(path)
    metadata, tensors, buffer = _parse(path)
    out, converted = {}, {}
    for t in progress(tensors, f"reading {path.name}"):
        raw = buffer[t.start:t.end]
        if t.ggml_type in FLOATS:
            storage, dtype = FLOATS[t.ggml_type]
            out[t.name] = (raw.view(storage).reshape(t.shape), dtype)
        elif t.ggml_type in dtypes.BY_GGML_TYPE:
            dtype = dtypes.BY_GGML_TYPE[t.ggml_type]
            out[t.name] = (raw.reshape(dtype.storage_shape(t.shape)), dtype)
        else:
            out[t.name] = (_to_bfloat16(path, t, raw), dtypes.bfloat16)
            converted[Q(t.ggml_type).name] = converted.get(Q(t.ggml_type).name, 0) + 1
    if converted:
        kinds = ", ".join(f"{n} {name}" for name, n in sorted(converted.items()))
        print(f"note: {path.name}: {kinds} tensors have no native kernels here; they were dequantised to "
              f"bfloat16 at load (Q4_0, Q8_0 and the Q4_K/Q5_K/Q6_K files are computed as stored)", file=sys.stderr)
    return metadata, out


DEQUANTIZE_ROWS = 1 << 14  # rows dequantised at once: bounds the float32 temporary of a big tensor


def _to_bfloat16(path: Path, t: _Tensor, raw: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    rows = raw.reshape(math.prod(t.shape[:-1]), -1)
    out = np.empty((rows.shape[0], t.shape[-1]), np.uint16)
    for start in range(0, rows.shape[0], DEQUANTIZE_ROWS):
        try:
            values = dequantize(np.asarray(rows[start:start + DEQUANTIZE_ROWS]), Q(t.ggml_type))
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name} is {Q(t.ggml_type).name}, which the gguf "
                                  f"package cannot dequantize") from None
        out[start:start + DEQUANTIZE_ROWS] = dtypes.narrow(values.astype(np.float32, copy=False), dtypes.bfloat16)
    return out.reshape(t.shape)
