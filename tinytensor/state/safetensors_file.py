"""safetensors: 8 bytes of header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw tensors. We map the file and view each tensor in place; bfloat16 stays as its
uint16 bits (NumPy has no bfloat16, and the safetensors package's NumPy API refuses it)."""
import json
import math
import struct
from pathlib import Path

import numpy as np

from ops import dtypes
from tinytensor.state import CheckpointError

DTYPES = {"F32": dtypes.float32, "F16": dtypes.float16, "BF16": dtypes.bfloat16,
          "I64": dtypes.int64, "I32": dtypes.int32, "I8": dtypes.int8, "BOOL": dtypes.bool_}
NAMES = {d: name for name, d in DTYPES.items()}


def read(path: Path) -> dict[str, tuple[np.ndarray, dtypes.DType]]:
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes does not fit in the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r")
    base, out = 8 + header_len, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not supported")
        dtype, (start, end) = DTYPES[info["dtype"]], info["data_offsets"]
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} needs bytes up to {base + end} "
                                  f"but the file has {size}; download it again")
        if end - start != math.prod(info["shape"]) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes for shape {info['shape']}")
        out[name] = (data[base + start:base + end].view(dtype.storage).reshape(info["shape"]), dtype)
    return out


def write(path: Path, tensors: dict[str, tuple[np.ndarray, dtypes.DType]], metadata: dict | None = None):
    """Write tensors (storage arrays with their dtype) in the safetensors layout."""
    header, offset = {}, 0
    for name, (array, dtype) in tensors.items():
        header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # align the data, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for array, _ in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
