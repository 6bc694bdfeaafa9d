"""GGUF files, read with the `gguf` package (the format's reference reader, kept by llama.cpp).
Float tensors are mapped in place; quantised ones (Q8_0, Q4_0, Q4_1, K-quants...) are
dequantised to float32 at load, for now."""
from pathlib import Path

import numpy as np

from ops import dtypes
from tinytensor.state import CheckpointError, progress


def _open(path: Path):
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file: truncated or damaged, download it again "
                              f"({type(e).__name__}: {e})") from None
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except (ValueError, IndexError):
            continue
    return reader, metadata


def read_metadata(path: Path) -> dict:
    return _open(Path(path))[1]


def read(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, dtypes.DType]]]:
    """(metadata, tensors). Tensor shapes are NumPy order: GGUF lists dims fastest-first."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    path = Path(path)
    reader, metadata = _open(path)
    tensors = {}
    for t in progress(reader.tensors, f"reading {path.name}"):
        shape = tuple(int(n) for n in reversed(t.shape))
        if t.tensor_type == Q.F32:
            tensors[t.name] = (t.data.reshape(shape), dtypes.float32)
        elif t.tensor_type == Q.F16:
            tensors[t.name] = (t.data.reshape(shape), dtypes.float16)
        elif t.tensor_type == Q.BF16:
            tensors[t.name] = (t.data.view(np.uint16).reshape(shape), dtypes.bfloat16)
        else:
            try:
                values = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise CheckpointError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which the gguf "
                                      f"package cannot dequantize") from None
            tensors[t.name] = (values.reshape(shape).astype(np.float32, copy=False), dtypes.float32)
    return metadata, tensors
