"""The LLVM lowering is retargetable: the same kernels emit vector code for other CPUs by
changing only the target (triple, CPU, features); nothing is run there."""
import re

import numpy as np
import pytest

from backends.llvm import codegen
from backends.llvm.target import AARCH64_DOTPROD, AARCH64_NEON, X86_64_AVX2, X86_64_AVX512, X86_64_AVX512_VNNI, assembly, host
from ops import dtypes

F32, BF16 = dtypes.float32, dtypes.bfloat16
KERNELS = {  # each built for the target it is compiled for (the products' vector width is the target's)
    "matvec": lambda target: codegen.matmul_nt_kernel("k", F32, (F32,), F32, 1, 4, target=target),
    "matvec-bf16": lambda target: codegen.matmul_nt_kernel("k", F32, (BF16,), F32, 1, 4, target=target),
    "matmul": lambda target: codegen.matmul_nt_kernel("k", F32, (F32,), F32, 4, 3, target=target),
    "fused-mul-add": lambda target: codegen.elementwise_kernel(
        "k", (("mul", None, (0, 1), F32), ("add", None, (2, 1), F32)), [F32, F32], F32, 1, (1, 1, 1)),
}
EXPECTED = [  # (target, a fused multiply-add on its full vectors, as its assembly spells one)
    (X86_64_AVX2, r"vfmadd\w+\t.*%ymm"),
    (X86_64_AVX512, r"vfmadd\w+\t.*%zmm"),
    (AARCH64_NEON, r"fmla\tv\d+\.4s"),
]


@pytest.mark.parametrize("kernel", ["matvec", "matvec-bf16", "matmul"])
@pytest.mark.parametrize("target, expected", EXPECTED, ids=["x86-avx2", "x86-avx512", "aarch64-neon"])
def test_matmul_kernels_use_fused_multiply_add_vectors(kernel, target, expected):
    asm = assembly(KERNELS[kernel](target), target)
    assert re.search(expected, asm), f"no {expected} for {target.cpu}"


@pytest.mark.parametrize("target, register", [(X86_64_AVX2, "ymm"), (X86_64_AVX512, "zmm"), (AARCH64_NEON, ".4s")],
                         ids=["x86-avx2", "x86-avx512", "aarch64-neon"])
def test_elementwise_kernels_vectorise(target, register):
    assert register in assembly(KERNELS["fused-mul-add"](target), target)


@pytest.mark.parametrize("target, instructions", [
    (X86_64_AVX2, ("vpmaddubsw", "vpmaddwd")),
    (X86_64_AVX512_VNNI, ("vpdpbusd",)),
    (AARCH64_NEON, ("smull", "addp")),  # widening multiplies, pairwise adds
    (AARCH64_DOTPROD, ("sdot",)),
], ids=["x86-avx2", "x86-vnni", "aarch64-neon", "aarch64-dotprod"])
def test_block_products_use_integer_dot_products(target, instructions):
    """q4_0 weights meet 8-bit activations in the target's byte dot product (blocks.dot)."""
    asm = assembly(codegen.matmul_nt_kernel("k", F32, (dtypes.q4_0,), F32, 1, 1, target=target), target)
    for needle in instructions:
        assert needle in asm, f"{needle} missing for {target.cpu}"


def test_without_avx512_no_zmm():
    assert "zmm" not in assembly(KERNELS["matmul"](X86_64_AVX2), X86_64_AVX2)


def test_the_host_target_names_the_real_cpu():
    t = host()
    if t.arch == "aarch64":  # LLVM may not know the core (qemu shows the host's /proc/cpuinfo):
        assert "+neon" in t.features.split(",")  # the features come from AT_HWCAP then
        return
    assert t.cpu not in ("", "generic") and t.features
    if t.arch == "x86_64":
        assert "+avx2" in t.features.split(",") or "-avx2" in t.features.split(",")


def test_a_second_process_reuses_compiled_kernels_from_disk(tmp_path):
    import subprocess
    import sys
    script = ("import backends; backends.use('llvm'); from tinytensor import Tensor; "
              "print((Tensor.randn(33, seed=1).exp() * 3).sum().item())")
    env = {**__import__("os").environ, "TT_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    objects = sorted(p.name for p in tmp_path.rglob("*.o"))
    assert objects, "no object code was cached"
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert sorted(p.name for p in tmp_path.rglob("*.o")) == objects  # nothing compiled again
    assert first.stdout == second.stdout


# ---- TT_TARGET: the kernels of a lower feature level, run on this machine ----------------------

def test_tt_target_chooses_a_level_the_cpu_has(monkeypatch):
    from backends.llvm import target
    monkeypatch.setattr(target, "_native", lambda: X86_64_AVX2)  # as an AVX2-only CPU (AMD Zen 3)
    assert target.levels_here() == ["avx2"]  # what the tests' `backend` fixture runs llvm at
    for name, want in (("avx2", X86_64_AVX2), ("x86-64-v3", X86_64_AVX2), ("native", X86_64_AVX2)):
        monkeypatch.setenv("TT_TARGET", name)
        host.cache_clear()
        assert host() == want
    for name, says in (("avx512", "lacks avx512f, avx512bw, avx512vl"), ("neon", "lacks aarch64"),
                       ("sse9", "give native or one of")):
        monkeypatch.setenv("TT_TARGET", name)
        host.cache_clear()
        with pytest.raises(ValueError, match=says):
            host()
    host.cache_clear()


def test_tt_target_avx2_runs_here_and_agrees_with_numpy(tmp_path):
    """Where the CPU has AVX2, the AVX2 kernels (no zmm, pmaddubsw byte products) compute the
    same q4_0 product and float sum as the NumPy meaning; they are cached apart from native ones."""
    import os
    import subprocess
    import sys
    if "+avx2" not in __import__("llvmlite.binding", fromlist=["x"]).get_host_cpu_features().flatten().split(","):
        pytest.skip("this CPU has no AVX2")
    script = """
import numpy as np, backends
from backends.llvm.target import host
from tinytensor import Tensor
from ops import dtypes
x, w = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32), np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
out = []
for name in ("numpy", "llvm"):
    backends.use(name)
    q = Tensor.from_numpy(dtypes.convert(w, dtypes.float32, dtypes.q4_0), dtypes.q4_0)
    out.append((Tensor.from_numpy(x) @ q.T).numpy())
print(host().cpu, float(np.abs(out[0] - out[1]).max()), float(np.abs(out[0]).max()))
"""
    env = {**os.environ, "TT_TARGET": "avx2", "TT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cpu, diff, scale = done.stdout.split()
    # same 8-bit activations and integer products; only the float sums of the 2 blocks' partial
    # products may be ordered differently: a few float32 ulps of the result
    assert cpu == "haswell" and float(diff) <= 4 * np.finfo(np.float32).eps * float(scale)


def test_kernels_met_in_another_order_are_found_in_the_disk_cache(tmp_path):
    """A kernel's name is part of the IR the cache hashes: named by the order they were met,
    three kernels met in reverse order left six object files."""
    import json
    import os
    import subprocess
    import sys
    script = """
import json, sys, backends
from tinytensor import Tensor
backends.use("llvm")
x = Tensor.randn(33, seed=1)
kernels = {"exp": lambda: x.exp(), "sin": lambda: x.sin(), "sum": lambda: (x * 3).sum()}
print(json.dumps([float(kernels[name]().numpy().sum()) for name in sys.argv[1:]]))
"""
    env = {**os.environ, "TT_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", script, "exp", "sin", "sum"], env=env, capture_output=True,
                           text=True, check=True)
    objects = sorted(p.name for p in tmp_path.rglob("*.o"))
    second = subprocess.run([sys.executable, "-c", script, "sum", "sin", "exp"], env=env, capture_output=True,
                            text=True, check=True)
    assert len(objects) >= 3 and sorted(p.name for p in tmp_path.rglob("*.o")) == objects
    assert json.loads(first.stdout) == json.loads(second.stdout)[::-1]
