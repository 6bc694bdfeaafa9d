"""Llama 3.1 / 3.2 and 3.2 Vision: the model (model.py; vision.py and mllama.py for Vision), their
configs (config.py, vision_config.py), Vision's image preprocessing (images.py), and `python -m
models.llama3` (__main__.py runs models/generation/cli.py). `load` (models/formats/loading.py) builds
a model from a checkpoint, a published size or the embedded default."""
from models.llama3.model import KVCache, Llama

__all__ = ["KVCache", "Llama", "available_memory", "find_local", "load"]
LOADING = ("available_memory", "find_local", "load")


def __getattr__(name):
    """load & co. from models/formats/loading.py, imported when first asked for: that module imports
    this package's configs and model, so importing it here up front would be circular."""
    if name in LOADING:
        from models.formats import loading
        return getattr(loading, name)
    raise AttributeError(f"module 'models.llama3' has no attribute {name!r}")
