"""Finding and reading Llama checkpoints in the layouts users have on disk, into one form:
(config, {Meta weight name: Tensor}, tokenizer). Each layout has its module: hf.py (Hugging
Face folders), meta.py (Meta folders), gguf.py (GGUF files); here are what they share: telling
them apart, the shape checks against the config, casting or quantizing at load, and random
weights of the exact architecture."""
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from models.formats import gguf, hf, meta, tensor_parallel, vision_checkpoint
from models.formats.quant_mix import fallback
from models.llama3 import config as configs, vision_config
from models.text.tokenizer import Llama3Tokenizer
from ops import dtypes
from tinytensor import Tensor
from tinytensor.state import CheckpointError, gguf_file, progress


def detect(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise CheckpointError(f"{path}: not a checkpoint: give a .gguf file or a checkpoint folder")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    raise CheckpointError(f"{path}: no checkpoint here: expected config.json + *.safetensors (Hugging Face), "
                          f"params.json + consolidated.*.pth (Meta), or a .gguf file")


def load(path: Path, dtype=None, part=(0, 1)):
    """(config, weights, tokenizer) from a checkpoint on disk. dtype: cast weights to it, or
    quantise them to it when it is a block type ('q8_0', 'q4_0', ...: see `quantised`); None
    keeps what the file holds (float types and the block types of ops/blocks/ as stored, other
    quantised GGUF tensors as bfloat16). part: (rank, size), the weights of process `rank` of
    `size` under tensor parallelism (models/formats/tensor_parallel.py), split before any cast."""
    path = Path(path)
    config, arrays, tokenizer = read(path, part)
    if part[1] > 1:
        arrays = tensor_parallel.Shards(config, arrays, *part)
    dtype = None if dtype is None else dtypes.to_dtype(dtype)
    weights = {}
    for name, (array, dt) in progress(arrays.items(), f"loading {path.name}", len(arrays)):
        if dtype is not None and dtype.block and not vision_checkpoint.stays_float(name):
            weights[name] = quantised(array, dt, dtype)
            continue
        t = Tensor.from_numpy(array, dt)
        weights[name] = t if dtype is None or dtype.block else t.cast(dtype).realize()
    return config, weights, tokenizer


def read(path: Path, part=(0, 1)):
    """(config, {Meta name: (array, dtype)}, tokenizer) as the checkpoint stores them: the arrays
    memory-mapped where the format allows, every shape checked against the config. part (rank,
    size): a Meta folder's model-parallel shards are merged only where process `rank` of `size`
    will take its share (tensor_parallel.Shards): the rest of such a tensor is zeros."""
    path = Path(path)
    kind = detect(path)
    read_meta = lambda folder: meta.read(folder, part)  # noqa: E731
    try:
        config, arrays, tokenizer = {"hf": hf.read, "meta": read_meta, "gguf": gguf.read}[kind](path)
    except configs.ConfigError as e:  # every config is checked once, when it is read
        config_file = {"hf": path / "config.json", "meta": path / "params.json", "gguf": path}[kind]
        raise CheckpointError(f"{config_file}: {e}") from None
    _check_shapes(path, config, arrays)
    return config, arrays, tokenizer


def quantised(array: np.ndarray, dt, dtype) -> Tensor:
    """A weight in the block type `dtype`, quantised in memory as llama-quantize would write it
    (ops.blocks.quantize), a few thousand rows at a time. Vectors (the norms) stay as they are;
    matrices whose rows are not whole blocks take llama.cpp's fallback type, as our GGUF writer
    gives them (quant_mix.fallback), or stay as they are where that is a float type."""
    target = fallback(dtype, dt.logical_shape(array.shape)[-1]) if array.ndim == 2 else dt
    if target == dt or not target.block:
        return Tensor.from_numpy(array, dt)
    return Tensor.from_numpy(dtypes.convert(array, dt, target), target)


def load_tokenizer(path: Path):
    """Just the tokenizer of a checkpoint folder, a .gguf file, or a Llama 3 tokenizer.model."""
    path = Path(path)
    if path.is_file() and path.suffix != ".gguf":
        return Llama3Tokenizer(path)
    kind = detect(path)
    if kind == "gguf":
        return gguf.read_tokenizer(path, gguf_file.read_metadata(path))
    tokenizer = hf.read_tokenizer(path) if kind == "hf" else meta.read_tokenizer(path)
    if tokenizer is None:
        raise CheckpointError(f"{path}: has no tokenizer (tokenizer.model or tokenizer.json)")
    return tokenizer


# ---- checks ---------------------------------------------------------------------------------

def expected_shapes(c) -> dict[str, tuple[int, ...]]:
    if isinstance(c, vision_config.MllamaConfig):
        return vision_checkpoint.expected_shapes(c, expected_shapes)
    shapes = {"tok_embeddings.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (c.n_heads * c.head_dim, c.dim),
            p + "attention.wk.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wv.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wo.weight": (c.dim, c.n_heads * c.head_dim),
            p + "feed_forward.w1.weight": (c.ffn_dim, c.dim),
            p + "feed_forward.w3.weight": (c.ffn_dim, c.dim),
            p + "feed_forward.w2.weight": (c.dim, c.ffn_dim),
            p + "attention_norm.weight": (c.dim,), p + "ffn_norm.weight": (c.dim,)})
    return shapes


def _check_shapes(path: Path, config, arrays):
    for name, shape in expected_shapes(config).items():
        if name not in arrays:
            raise CheckpointError(f"{path}: weight {name} is missing")
        array, dtype = arrays[name]
        if dtype.logical_shape(array.shape) != shape:
            raise CheckpointError(f"{path}: weight {name} has shape {dtype.logical_shape(array.shape)}, "
                                  f"expected {shape} for this model's config")


def random_array(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """One weight of a random model: normal with a 1/sqrt(fan_in) scale so activations stay
    O(1); norms are ones. Each tensor has its own stream (from the seed and its name), so a
    writer can make one at a time."""
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(int(np.prod(shape[1:])) ** -0.5)


class RandomArrays(Mapping):
    """The exact architecture's weights as float32 arrays, each made when it is read, so that
    writing a random 8B checkpoint never holds more than one float32 tensor."""

    def __init__(self, c, seed: int = 0):
        self.shapes, self.seed = expected_shapes(c), seed

    def __getitem__(self, name: str) -> np.ndarray:
        return random_array(name, self.shapes[name], self.seed)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def random_weights(c, seed: int = 0, dtype=dtypes.float32, only=None, part=(0, 1)) -> dict[str, Tensor]:
    """The exact architecture (a LlamaConfig or a vision MllamaConfig) with random weights (for
    benchmarks and tests), as Tensors of dtype; only: a name test, to make just those weights;
    part: (rank, size), as for `load`."""
    arrays = RandomArrays(c, seed)
    if part[1] > 1:
        arrays = tensor_parallel.Shards(c, arrays, *part)
    names = [name for name in arrays if only is None or only(name)]
    if dtype.block:
        return {name: Tensor.from_numpy(arrays[name]) if vision_checkpoint.stays_float(name)
                else quantised(arrays[name], dtypes.float32, dtype)
                for name in progress(names, "random weights", len(names))}
    return {name: Tensor.from_numpy(dtypes.narrow(arrays[name], dtype), dtype)
            for name in progress(names, "random weights", len(names))}
