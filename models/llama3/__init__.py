"""Llama 3.1 / 3.2: the model (model.py) and `python -m models.llama3`, the command line
(__main__.py runs models/cli.py, which imports the model; nothing imports back)."""
from models.llama3.model import KVCache, Llama, available_memory, find_local, load

__all__ = ["KVCache", "Llama", "available_memory", "find_local", "load"]
