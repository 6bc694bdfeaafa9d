"""PyTorch .pth checkpoints, read without PyTorch.

A .pth file is a zip: `<name>/data.pkl` is a pickle of the state dict in which each tensor is a
call to torch._utils._rebuild_tensor_v2 on a "persistent" storage, and `<name>/data/<key>` holds
that storage's raw bytes (stored uncompressed). We unpickle with a short allow-list of globals,
so a malicious file cannot run code, and view each storage in place with np.memmap.
"""
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ops import dtypes
from tinytensor.state import CheckpointError

STORAGES = {"FloatStorage": dtypes.float32, "HalfStorage": dtypes.float16,
            "BFloat16Storage": dtypes.bfloat16, "LongStorage": dtypes.int64,
            "IntStorage": dtypes.int32, "CharStorage": dtypes.int8, "BoolStorage": dtypes.bool_}


class _Storage:
    def __init__(self, dtype, array):
        self.dtype, self.array = dtype, array


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    """A view of the storage; every index it can reach is checked to lie inside the storage
    first (as_strided would read any memory it is told to)."""
    if not isinstance(storage, _Storage) or not _index(offset) or not _indices(size) or not _indices(stride) \
            or len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor record that is not (storage, offset, sizes, strides)")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.array.size:
        raise pickle.UnpicklingError(f"a tensor of size {tuple(size)} reaches past its storage of "
                                     f"{storage.array.size} values")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage.array[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride), writeable=False)
    return view, storage.dtype


def _is_tensor(value) -> bool:
    """What _rebuild_tensor makes (a damaged pickle can build other tuples in its place)."""
    return type(value) is tuple and len(value) == 2 and isinstance(value[0], np.ndarray) \
        and isinstance(value[1], dtypes.DType)


def _index(value) -> bool:
    return type(value) is int and value >= 0


def _indices(values) -> bool:
    return isinstance(values, tuple) and all(map(_index, values))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path, archive, prefix):
        super().__init__(file)
        self.path, self.archive, self.prefix, self.memmap = path, archive, prefix, None

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in STORAGES:
            return STORAGES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"{self.path}: refuses to load {module}.{name}: only tensors "
                                     f"and dicts are allowed in a checkpoint")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise pickle.UnpicklingError("a storage record that is not (kind, type, key, location, size)")
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, dtypes.DType) or not isinstance(key, str) or not _index(numel):
            raise pickle.UnpicklingError("a storage record of an unsupported kind or type")
        try:
            info = self.archive.getinfo(f"{self.prefix}/data/{key}")
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: storage {key} is compressed; re-save it with torch.save")
        start = _data_offset(self.path, info)
        if start + numel * dtype.itemsize > self.path.stat().st_size:
            raise CheckpointError(f"{self.path}: truncated: storage {key} runs past the end of the file; "
                                  f"download it again")
        if self.memmap is None:
            self.memmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self.memmap[start:start + numel * dtype.itemsize]
        return _Storage(dtype, raw.view(dtype.storage))


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes start: after its local header, whose name and extra
    field lengths can differ from the central directory's."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read(path: Path) -> dict[str, tuple[np.ndarray, dtypes.DType]]:
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint ({e}); it may be truncated") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            raise CheckpointError(f"{path}: no data.pkl inside: not a PyTorch checkpoint")
        prefix = pickles[0][: -len("/data.pkl")]
        try:
            with archive.open(pickles[0]) as f:
                state = _Unpickler(f, path, archive, prefix).load()
        except pickle.UnpicklingError as e:
            message = str(e)
            raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error,
                zipfile.BadZipFile, RecursionError, MemoryError, OverflowError) as e:
            # a damaged pickle fails in many ways inside the unpickler; none of them runs code. Their
            # messages may quote the damaged bytes (a newline among them): repr keeps it one line
            raise CheckpointError(f"{path}: its data.pkl is damaged ({type(e).__name__}: {str(e)!r}); "
                                  f"download it again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and _is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return dict(state)
