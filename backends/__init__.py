"""The backend registry. A backend is a module exposing `BACKEND`, an object with
`name` and `execute(schedule) -> list of arrays, one per schedule.outputs`.

The core asks for a backend by the name the user chose (TT_BACKEND, or `use`), so it never
imports one itself; backends are loaded on first use.
"""
import importlib
import os

KNOWN = {
    "numpy": "backends.numpy_backend",
    "llvm": "backends.llvm",
}
DEFAULT = "llvm"  # native code; "numpy" is the reference it is tested against

_chosen: str | None = None
_loaded: dict = {}


def use(name: str | None) -> None:
    """Choose the backend for this process (None: back to TT_BACKEND or the default)."""
    global _chosen
    if name is not None:
        _check(name)
    _chosen = name


def current_name() -> str:
    return _chosen or os.environ.get("TT_BACKEND") or DEFAULT


def current():
    name = current_name()
    _check(name)
    if name not in _loaded:
        _loaded[name] = importlib.import_module(KNOWN[name]).BACKEND
    return _loaded[name]


def _check(name: str) -> None:
    if name not in KNOWN:
        raise ValueError(f"unknown backend {name!r} (from TT_BACKEND or use()); "
                         f"choose one of: {', '.join(KNOWN)}")
