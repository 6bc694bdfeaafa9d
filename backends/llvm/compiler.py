"""JIT compilation for the host with MCJIT, cached by the IR's hash: in memory for this
process, and as object code on disk ($TT_CACHE/llvm) so a second process does not recompile."""
import ctypes
import hashlib
import os
from pathlib import Path

import llvmlite.binding as llvm
import numpy as np

from backends.llvm.emitter import HALF_TABLE
from backends.llvm.target import host, machine, optimize

# The data kernels refer to by name, resolved wherever their object code is loaded (so the
# disk cache's objects hold no address of this process)
with np.errstate(invalid="ignore"):  # the NaNs' payloads (aarch64's NumPy flags signalling ones)
    _half_table = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
llvm.add_symbol(HALF_TABLE, _half_table.ctypes.data)

_functions: dict[tuple, object] = {}  # (target, hash of the IR, function name)
_engines = []  # compiled code lives as long as its engine


def cache_dir() -> Path:
    base = os.environ.get("TT_CACHE") or Path.home() / ".cache" / "tinytensor"
    return Path(base) / "llvm" / hashlib.sha256(repr(host()).encode()).hexdigest()[:16]


def compile_function(ir: str, name: str, argtypes: list):
    """A ctypes function for `name` in module `ir`, compiled once per distinct IR."""
    key, target = hashlib.sha256(ir.encode()).hexdigest(), host()
    if (target, key, name) in _functions:
        return _functions[target, key, name]
    disk = cache_dir() / f"{key}.o"
    if disk.exists():
        module = llvm.parse_assembly(ir)  # symbols only: the object code comes from the cache
        module.triple = target.triple
    else:
        module = optimize(ir, target)
    engine = llvm.create_mcjit_compiler(module, machine(target))

    def save(_module, buffer):
        disk.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: processes compiling the same kernel at once (the ranks
        # of an mpirun) each write whole files, and the last rename wins
        partial = disk.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(buffer)
        partial.rename(disk)

    def load(_module):
        return disk.read_bytes() if disk.exists() else None

    engine.set_object_cache(save, load)
    engine.finalize_object()
    _engines.append(engine)
    fn = ctypes.CFUNCTYPE(None, *argtypes)(engine.get_function_address(name))
    _functions[target, key, name] = fn
    return fn
