"""A model from what the user names: a checkpoint path (any layout checkpoint.py reads), a
published size found where users keep weights (the Hugging Face cache, Meta's download folder),
or the embedded default; or a size's exact architecture with random weights. The result is a
models.llama3 Llama (or, for a Vision config, the VisionLlama with its image encoder)."""
import os
import re
from pathlib import Path

from models.llama3.config import SIZES
from models.llama3.model import Llama
from models.llama3.vision_config import VISION_SIZES, MllamaConfig
from models.text.tokenizer import Llama3Tokenizer
from tinytensor import dtypes
from tinytensor.distributed import SINGLE, Group
from tinytensor.state import CheckpointError

HF_REPOS = {"1b": "Llama-3.2-1B", "3b": "Llama-3.2-3B", "8b": "Llama-3.1-8B", "70b": "Llama-3.1-70B",
            "405b": "Llama-3.1-405B", "11b": "Llama-3.2-11B-Vision", "90b": "Llama-3.2-90B-Vision"}


def find_local(size: str) -> Path:
    """Where users keep Llama weights: the Hugging Face cache, then Meta's download folder."""
    hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    for variant in ("-Instruct", ""):
        repo = HF_REPOS[size] + variant
        snapshots = sorted((hub / f"models--meta-llama--{repo}" / "snapshots").glob("*/config.json"))
        if snapshots:
            return snapshots[-1].parent
        meta = Path.home() / ".llama" / "checkpoints" / repo.replace("Llama-", "Llama")
        if (meta / "params.json").exists():
            return meta
    raise CheckpointError(
        f"no {HF_REPOS[size]} weights found in {hub} or ~/.llama/checkpoints: download them with "
        f"`huggingface-cli download meta-llama/{HF_REPOS[size]}-Instruct` (or Meta's `llama model download`), "
        f"pass --checkpoint PATH, or use --random-init")


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def load(path_or_size=None, random_init: bool = False, dtype=None, context: int = 8192,
         group: Group = SINGLE) -> Llama:
    """A model from a checkpoint path, a published size ('1b' ... '405b'), or (None) the
    embedded default, SmolLM2-135M-Instruct. random_init builds a size's exact architecture with
    random weights and the Llama 3 tokenizer. group: the processes to split it over (each call
    loads its own process's shards: tinytensor.distributed.from_environment() under mpirun)."""
    part = (group.rank, group.size)
    from models.formats import checkpoint
    from models.formats.assets import fetch

    if path_or_size is None:
        path_or_size = fetch("smollm2-135m")
    if random_init:
        if path_or_size not in SIZES and path_or_size not in VISION_SIZES:
            raise ValueError(f"--random-init needs a size ({', '.join([*SIZES, *VISION_SIZES])}), "
                             f"got {path_or_size!r}")
        config = SIZES.get(path_or_size) or VISION_SIZES[path_or_size]
        dt = dtypes.to_dtype(dtype or "float32")
        need, free = config.n_params() * dt.itemsize, available_memory()
        if need > 0.9 * free:
            halved = dt.itemsize == 4 and need / 2 <= 0.9 * free
            raise MemoryError(f"{path_or_size} with random {dt.name} weights needs {need / 2**30:.1f} GiB "
                              f"but {free / 2**30:.1f} GiB is free: "
                              f"{'use --dtype bfloat16' if halved else 'pick a smaller size'}")
        vision = isinstance(config, MllamaConfig)
        tokenizer = Llama3Tokenizer(fetch("llama3-tokenizer"), config.image_token_id if vision else None)
        return _model(config, checkpoint.random_weights(config, dtype=dt, part=part), tokenizer, context, group=group)
    if path_or_size in SIZES or path_or_size in VISION_SIZES:
        path_or_size = find_local(path_or_size)
    elif isinstance(path_or_size, str) and re.fullmatch(r"\d+(\.\d+)?[bBmM]", path_or_size) \
            and not Path(path_or_size).exists():
        raise ValueError(f"unknown size {path_or_size!r}: the sizes are {', '.join(SIZES)}; or give a checkpoint path")
    config, weights, tokenizer = checkpoint.load(Path(path_or_size), dtype, part)
    if tokenizer is None:
        raise CheckpointError(f"{path_or_size}: has weights but no tokenizer: looked for tokenizer.json, "
                              f"tokenizer.model and original/tokenizer.model; copy the model's tokenizer files "
                              f"next to its weights")
    return _model(config, weights, tokenizer, context, Path(path_or_size), group)


def _model(config, weights, tokenizer, context, folder=None, group=SINGLE) -> Llama:
    """A Llama, or for a Llama 3.2 Vision config the model with its image encoder."""
    if not isinstance(config, MllamaConfig):
        return Llama(config, weights, tokenizer, context, group)
    from models.llama3.images import ImageSettings
    from models.llama3.mllama import VisionLlama
    v = config.vision
    settings = ImageSettings.from_folder(folder, v.image_size, v.max_tiles) if folder and folder.is_dir() else None
    return VisionLlama(config, weights, tokenizer, context, settings)
