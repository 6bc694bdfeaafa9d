"""Meta folders as `llama model download` leaves them: params.json + consolidated.NN.pth (one per
model-parallel shard, merged here along the axes Meta split) + tokenizer.model. The .pth files
are read without PyTorch (tinytensor.state.pth_file). Llama 3.2 Vision's names and layouts:
meta_vision.py."""
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.formats import meta_vision, tensor_parallel
from models.llama3 import config as configs
from models.text.tokenizer import Llama3Tokenizer
from tinytensor.state import CheckpointError, files, pth_file

# Meta's model-parallel shards split these along the given axis; norms are replicated.
SHARD_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
              "wo": 1, "w2": 1, "tok_embeddings": 1}


def read(folder: Path, part=(0, 1)):
    params = files.read_json(folder, "params.json")
    shards = [files.inside(folder, p.name) for p in sorted(folder.glob("consolidated.*.pth"))]
    if not shards:
        raise CheckpointError(f"{folder}: params.json but no consolidated.*.pth weights")
    states = [pth_file.read(p) for p in shards]
    if meta_vision.is_vision(params):
        if part[1] > 1:
            raise CheckpointError(f"{folder}: a Llama 3.2 Vision model runs in one process: start it without mpirun")
        arrays = _merged(folder, states, meta_vision.split_axis)
        vocab = arrays.get("text_model.tok_embeddings.weight")  # params.json may say vocab_size -1
        config = meta_vision.config(params, vocab[0].shape[0] if vocab and vocab[0].ndim == 2 else None,
                                    meta_vision.width_of(arrays, folder))
        return config, meta_vision.ours(config, arrays, folder), read_tokenizer(folder, config.image_token_id)
    tokenizer = read_tokenizer(folder)
    embedding = states[0].get("tok_embeddings.weight")  # params.json may say vocab_size -1
    vocab = embedding[0].shape[0] if embedding is not None and embedding[0].ndim == 2 else None
    config = configs.from_meta(params, vocab_size=vocab)
    arrays = _merged(folder, states, lambda name: SHARD_AXIS.get(name.split(".")[-2] if "." in name else name), part)
    if "output.weight" not in arrays:
        config = replace(config, tied_embeddings=True)
    elif config.tied_embeddings:  # a published tied size saved with an explicit head
        config = replace(config, tied_embeddings=False)
    return config, arrays, tokenizer


def _merged(folder: Path, states: list[dict], axis_of, part=(0, 1)) -> dict:
    """The shards' tensors as one, concatenated along axis_of(name) (None: each shard holds it all)."""
    arrays = {}
    for name in states[0]:
        if name.endswith("rope.freqs"):
            continue
        axis = axis_of(name)
        parts = [s.get(name) for s in states]
        if len(parts) == 1 or axis is None:
            arrays[name] = parts[0]
            continue
        if any(p is None or p[0].ndim != parts[0][0].ndim or p[1] != parts[0][1] for p in parts) \
                or parts[0][0].ndim <= axis:
            raise CheckpointError(f"{folder}: the shards' {name} do not fit together: a shard is damaged or "
                                  f"from another model")
        try:
            if part[1] > 1 and tensor_parallel.split_axis(name) == axis:
                arrays[name] = (_merged_share([a for a, _ in parts], axis, *part), parts[0][1])
                continue
            arrays[name] = (np.concatenate([a for a, _ in parts], axis=axis), parts[0][1])
        except ValueError:
            raise CheckpointError(f"{folder}: the shards' {name} have shapes that do not fit together") from None
    return arrays


def _merged_share(parts: list, axis: int, rank: int, size: int) -> np.ndarray:
    """The shards concatenated along `axis`, with only process rank's 1/size of that axis filled
    in, from the files that hold it; the rest is zeros never written (no memory), so that rank r
    of N reads only its part of Meta's model-parallel files (Meta splits the matrices along the
    axes tensor parallelism does)."""
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    out = np.zeros(shape, parts[0].dtype)
    lo, hi, offset = rank * (shape[axis] // size), (rank + 1) * (shape[axis] // size), 0
    for p in parts:
        a, b = max(lo, offset), min(hi, offset + p.shape[axis])
        if a < b:
            dst, src = [slice(None)] * len(shape), [slice(None)] * len(shape)
            dst[axis], src[axis] = slice(a, b), slice(a - offset, b - offset)
            out[tuple(dst)] = p[tuple(src)]
        offset += p.shape[axis]
    return out


def read_tokenizer(folder: Path, image_token_id: int | None = None):
    path = folder / "tokenizer.model"
    if not path.exists():
        return None
    tokenizer = Llama3Tokenizer(files.inside(folder, path.name), image_token_id)
    tokenizer.instruct = "instruct" in folder.resolve().name.lower()  # params.json does not say
    return tokenizer
