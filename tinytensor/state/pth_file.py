"""PyTorch .pth checkpoints, read without PyTorch.

A .pth file is a zip: `<name>/data.pkl` is a pickle of the state dict in which each tensor is a
call to torch._utils._rebuild_tensor_v2 on a "persistent" storage, and `<name>/data/<key>` holds
that storage's raw bytes (stored uncompressed). We unpickle with a short allow-list of globals,
so a malicious file cannot run code, and view each storage in place with np.memmap.

The allow-list alone is not enough: pickle's BUILD opcode sets attributes on any object on its
stack, so a file could retype a storage after its size was checked (numpy would read past the
mapping) or rename a shared dtype for the rest of the process. The unpickler here runs only the
opcodes a state dict needs: BUILD only on a dict it made (torch's state_dict() carries a
`_metadata` attribute that way, which we drop), appends only to lists, items only into dicts,
no INST/OBJ/NEWOBJ/EXT. data.pkl is read whole, within MAX_PICKLE_BYTES, before any of it runs.
"""
import io
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ops import dtypes
from tinytensor.state import CheckpointError, files

STORAGES = {"FloatStorage": dtypes.float32, "HalfStorage": dtypes.float16,
            "BFloat16Storage": dtypes.bfloat16, "LongStorage": dtypes.int64,
            "IntStorage": dtypes.int32, "CharStorage": dtypes.int8, "BoolStorage": dtypes.bool_}


MAX_PICKLE_BYTES = 64 << 20  # a 405B shard's data.pkl is ~0.1 MB: its bytes are records, not weights


class _Storage:
    __slots__ = ("dtype", "array")

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


def _refuse(name: str):
    def load(self):
        raise pickle.UnpicklingError(f"a {name} opcode: a state dict of tensors has none")
    return load


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler (its opcode table can be changed; the C one's cannot) with the
    opcodes that mutate or construct arbitrary objects narrowed to plain containers."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path, archive, prefix):
        super().__init__(file)
        self.path, self.archive, self.prefix, self.memmap = path, archive, prefix, None

    def load_build(self):
        state = self.stack.pop()
        if type(self.stack[-1]) not in (dict, OrderedDict) or not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a BUILD on a {type(self.stack[-1]).__name__}: only a state dict's "
                                         f"own attributes may be set")

    def load_append(self):
        value = self.stack.pop()
        self._container((list,), "an append").append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._container((list,), "an append").extend(items)

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._container((dict, OrderedDict), "an item set")[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._container((dict, OrderedDict), "an item set")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def _container(self, kinds: tuple, what: str):
        """The object on top of the stack, when it is a plain container of the kinds allowed."""
        target = self.stack[-1] if self.stack else None
        if type(target) not in kinds:
            raise pickle.UnpicklingError(f"{what} on a {type(target).__name__}: a state dict has only "
                                         f"plain lists and dicts")
        return target

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    for _op in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
        dispatch[getattr(pickle, _op)[0]] = _refuse(_op)

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


def _pickle_bytes(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    """data.pkl's bytes, refused unread when the zip says they are too many and cut off at the
    bound when it lies (a deflated member of 3 MB can inflate to gigabytes)."""
    too_big = CheckpointError(f"{path}: its data.pkl holds more than {MAX_PICKLE_BYTES >> 20} MiB of records, "
                              f"far more than any checkpoint's: the file is damaged or hostile")
    if archive.getinfo(name).file_size > MAX_PICKLE_BYTES:
        raise too_big
    with archive.open(name) as f:
        raw = f.read(MAX_PICKLE_BYTES + 1)
    if len(raw) > MAX_PICKLE_BYTES:
        raise too_big
    return raw


def read(path: Path) -> dict[str, tuple[np.ndarray, dtypes.DType]]:
    path = files.regular(path)  # a FIFO would block the open
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
            raw = _pickle_bytes(path, archive, pickles[0])
            state = _Unpickler(io.BytesIO(raw), path, archive, prefix).load()
        except pickle.UnpicklingError as e:
            message = str(e)
            raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error,
                zipfile.BadZipFile, zlib.error, RecursionError, MemoryError, OverflowError) as e:
            # a damaged pickle fails in many ways inside the unpickler; none of them runs code. Their
            # messages may quote the damaged bytes (a newline among them): repr keeps it one line
            raise CheckpointError(f"{path}: its data.pkl is damaged ({type(e).__name__}: {str(e)!r}); "
                                  f"download it again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and _is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return dict(state)
