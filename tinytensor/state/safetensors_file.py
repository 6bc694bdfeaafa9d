"""safetensors: 8 bytes of header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw tensors. We map the file and view each tensor in place; bfloat16 stays as its
uint16 bits (NumPy has no bfloat16, and the safetensors package's NumPy API refuses it)."""
import json
import math
import struct
from pathlib import Path

import numpy as np

from ops import dtypes
from tinytensor.state import CheckpointError, files, check_no_overlap

DTYPES = {"F32": dtypes.float32, "F16": dtypes.float16, "BF16": dtypes.bfloat16,
          "I64": dtypes.int64, "I32": dtypes.int32, "I8": dtypes.int8, "BOOL": dtypes.bool_}
NAMES = {d: name for name, d in DTYPES.items()}


def read(path: Path) -> dict[str, tuple[np.ndarray, dtypes.DType]]:
    path = files.regular(path)  # a FIFO would block the open
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes does not fit in the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    base, out, spans = 8 + header_len, {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = _entry(path, name, info)
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} needs bytes up to {base + end} "
                                  f"but the file has {size}; download it again")
        if end - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes for shape {shape}")
        spans.append((start, end, name))
        out[name] = (data[base + start:base + end].view(dtype.storage).reshape(shape), dtype)
    check_no_overlap(path, spans)
    return out


def _entry(path: Path, name: str, info) -> tuple[dtypes.DType, list[int], tuple[int, int]]:
    """A header entry's dtype, shape and byte range, each checked for its form."""
    def bad(what):
        return CheckpointError(f"{path}: tensor {name}: {what}; the file is damaged or not a safetensors file")
    if not isinstance(info, dict):
        raise bad("its header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, which is not supported "
                              f"({', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise bad(f"shape {shape!r} is not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets) \
            or not 0 <= offsets[0] <= offsets[1]:
        raise bad(f"data_offsets {offsets!r} is not [start, end]")
    return DTYPES[dtype], shape, tuple(offsets)


def write(path: Path, tensors: dict[str, tuple[np.ndarray, dtypes.DType]], metadata: dict | None = None):
    """Write tensors (storage arrays with their dtype) in the safetensors layout. A tensor may
    also be (function making its array, shape, dtype): it is made only when its bytes are
    written, so a writer holds one tensor at a time."""
    def shape_of(entry):
        return entry[1] if callable(entry[0]) else entry[0].shape

    header, offset = {}, 0
    for name, entry in tensors.items():
        nbytes = math.prod(shape_of(entry)) * entry[-1].itemsize
        header[name] = {"dtype": NAMES[entry[-1]], "shape": list(shape_of(entry)),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # align the data, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for entry in tensors.values():
            array = entry[0]() if callable(entry[0]) else entry[0]
            np.ascontiguousarray(array).tofile(f)
