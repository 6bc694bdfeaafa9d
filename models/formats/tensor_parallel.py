"""Megatron-style tensor parallelism: how a Llama's weights split over the N processes of a
group (tinytensor.distributed), each holding 1/N of every large matrix.

    wq, wk, wv, w1, w3   split by output rows: whole heads, whole FFN columns per process
    wo, w2               split by input columns: each process's partial sum, then one allreduce
    output head          split by vocabulary rows, the logits gathered
    norms, embedding     replicated (the embedding is read one row per token)

so a block costs two allreduces of the [tokens, dim] activation (model.py). Each process keeps
the keys and values of its own heads. Weights are split as stored, before they become tensors:
a block-quantised matrix splits along its columns in whole blocks.
"""
import ctypes
import mmap
from collections.abc import Mapping

import numpy as np

from tinytensor import dtypes

ROWS, COLUMNS = 0, 1
SPLIT = {"attention.wq.weight": ROWS, "attention.wk.weight": ROWS, "attention.wv.weight": ROWS,
         "attention.wo.weight": COLUMNS, "feed_forward.w1.weight": ROWS, "feed_forward.w3.weight": ROWS,
         "feed_forward.w2.weight": COLUMNS, "output.weight": ROWS}


def split_axis(name: str):
    """The axis a weight splits along (ROWS or COLUMNS), or None when every process holds it whole."""
    return SPLIT.get(name.split(".", 2)[2] if name.startswith("layers.") else name)


def check(config, size: int) -> None:
    """ValueError unless a text model with this config splits over `size` processes."""
    if size == 1:
        return
    if not hasattr(config, "n_kv_heads"):  # a Llama 3.2 Vision config
        raise ValueError("tensor parallelism runs the text models: run a Llama 3.2 Vision model as one process")
    for what, n in (("key/value heads", config.n_kv_heads), ("FFN columns", config.ffn_dim),
                    ("vocabulary rows", config.vocab_size)):
        if n % size:
            raise ValueError(f"{config.name}'s {n} {what} do not split over {size} processes: run a number of "
                             f"processes that divides {config.n_kv_heads} (its key/value heads)")


def shard(name: str, array: np.ndarray, dt, rank: int, size: int) -> np.ndarray:
    """Process `rank`'s part of the weight `name`, as stored (array in dt's storage form). Rows
    are a view: of a memory-mapped file only those pages are ever read. Columns are copied, and
    the pages the copy read are dropped from this process, so each one's memory holds 1/size."""
    axis = split_axis(name)
    if size == 1 or axis is None:
        return array
    shape = dt.logical_shape(array.shape)
    n = shape[axis] // size
    if axis == ROWS:
        return array[rank * n:(rank + 1) * n]
    if dt.block and n % dt.block.values:
        raise ValueError(f"{name}: {shape[1]} columns of {dt.name} do not split into whole blocks of "
                         f"{dt.block.values} over {size} processes")
    width = dt.storage_shape((1, n))[-1]
    part = np.ascontiguousarray(array[:, rank * width:(rank + 1) * width])
    _drop_pages(array)
    return part


_libc = ctypes.CDLL(None, use_errno=True)
MADV_DONTNEED = 4  # Linux: unmap the pages; a file's are read again from the page cache if touched


def _drop_pages(array: np.ndarray) -> None:
    """Give back the whole pages a memory-mapped array spans (no-op for arrays in memory): after
    a column split read every row of it, they would stay counted in this process's memory."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if not isinstance(base, mmap.mmap) or array.size == 0:
        return
    start = array.__array_interface__["data"][0]
    end = start + (array.shape[0] - 1) * array.strides[0] + array.shape[-1] * array.strides[-1]
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


class Shards(Mapping):
    """Process `rank`'s part of every weight of `arrays` (a mapping of name -> array, or name ->
    (array, dtype) as checkpoint.read gives them), each split when it is read, so that a random
    or quantised-at-load model never holds a whole model's worth of float32. A tied head split
    over processes becomes an `output.weight` of its own: this process's rows of the embedding."""

    def __init__(self, config, arrays: Mapping, rank: int, size: int):
        check(config, size)
        self.arrays, self.rank, self.size = arrays, rank, size
        self.names = list(arrays)
        if size > 1 and "output.weight" not in arrays:
            self.names.append("output.weight")

    def __getitem__(self, name):
        value = self.arrays["tok_embeddings.weight" if name not in self.arrays and name == "output.weight" else name]
        array, dt = value if isinstance(value, tuple) else (value, dtypes.float32)
        part = shard(name, array, dt, self.rank, self.size)
        return (part, dt) if isinstance(value, tuple) else part

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)
