"""Tensor parallelism (models/formats/tensor_parallel.py, tinytensor/distributed.py): the weights split
and put back together, the collective ops' meaning, and real runs under mpiexec (MPICH from
PyPI, installed by the test extra) on 1, 2 and 4 ranks over loopback against one process.

Tolerance: a split model differs from the whole one only in the order of summation: wo's and
w2's dot products are summed as N partial sums and then added (the allreduce). Each product a
logit passes through (4 per layer and the head) can move by at most a K-term float32 summation
error (tests.reference.summation_error) of values the size of the logits; a wrong split (heads
or FFN columns paired with the wrong rows) moves logits by O(1)."""
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.formats import checkpoint, tensor_parallel
from models.formats.gguf_writer import write_gguf
from models.llama3 import load
from models.llama3.config import LlamaConfig
from models.llama3.vision_config import VISION_SIZES
from ops import dtypes
from tests import tensor_parallel_worker as worker
from tests.reference import quantised_products_on_path, summation_error
from tinytensor import Tensor
from tinytensor.distributed import SINGLE
from tinytensor.jit import jit
from tools import make_checkpoint

pytestmark = pytest.mark.slow

GQA = dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, ffn_dim=256, max_context=64)
WORKER = Path(worker.__file__)
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def bound(config: dict, logits: np.ndarray) -> float:
    k = max(config["dim"], config["ffn_dim"])
    return quantised_products_on_path(config["n_layers"]) * summation_error(k, float(np.abs(logits).max()))


# ---- the split, as stored -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "q8_0", "q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("name", ["layers.0.attention.wq.weight", "layers.3.feed_forward.w2.weight", "output.weight"])
def test_shards_put_back_together_are_the_weight(dtype, name):
    dt = dtypes.to_dtype(dtype)
    values = np.random.default_rng(0).standard_normal((64, 1024), dtype=np.float32)
    stored = dtypes.convert(values, dtypes.float32, dt) if dt.block else dtypes.narrow(values, dt)
    axis = tensor_parallel.split_axis(name)
    for size in (1, 2, 4):
        parts = [tensor_parallel.shard(name, stored, dt, rank, size) for rank in range(size)]
        assert all(dt.logical_shape(p.shape)[axis] == values.shape[axis] // size for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts, axis=axis), stored)


def test_replicated_weights_are_not_split():
    norm = np.ones(128, np.float32)
    assert tensor_parallel.shard("layers.0.ffn_norm.weight", norm, dtypes.float32, 1, 2) is norm
    embedding = np.ones((256, 128), np.float32)
    assert tensor_parallel.shard("tok_embeddings.weight", embedding, dtypes.float32, 1, 2) is embedding


def test_a_tied_head_is_split_from_the_embedding():
    config = LlamaConfig(**{**GQA, "tied_embeddings": True})
    shards = tensor_parallel.Shards(config, checkpoint.RandomArrays(config), 1, 2)
    whole = checkpoint.RandomArrays(config)["tok_embeddings.weight"]
    np.testing.assert_array_equal(shards["output.weight"], whole[128:])
    np.testing.assert_array_equal(shards["tok_embeddings.weight"], whole)


def test_splits_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="4 key/value heads do not split over 3 processes"):
        tensor_parallel.check(LlamaConfig(**GQA), 3)
    with pytest.raises(ValueError, match="run a Llama 3.2 Vision model as one process"):
        tensor_parallel.check(VISION_SIZES["11b"], 2)
    blocks = dtypes.convert(np.ones((8, 64), np.float32), dtypes.float32, dtypes.q4_0)
    with pytest.raises(ValueError, match="whole blocks of 32 over 4 processes"):
        tensor_parallel.shard("layers.0.attention.wo.weight", blocks, dtypes.q4_0, 0, 4)


def mapped_kb(path: Path) -> int:
    """This process's resident KB of the file mapped at `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's first line: its addresses ... its path
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_column_split_of_a_mapped_file_drops_the_pages_it_read(tmp_path):
    path = tmp_path / "w.bin"
    values = np.arange(512 * 4096, dtype=np.float32).reshape(512, 4096)  # 8 MB
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=values.shape)
    assert float(mapped[:, ::1024].sum()) == float(values[:, ::1024].sum())  # every page read
    assert mapped_kb(path) >= 8000
    part = tensor_parallel.shard("layers.0.feed_forward.w2.weight", mapped, dtypes.float32, 1, 2)
    np.testing.assert_array_equal(part, values[:, 2048:])
    assert part.base is None  # a copy of its own
    assert mapped_kb(path) < 100  # the mapped pages given back: this process holds only its half
    np.testing.assert_array_equal(np.asarray(mapped), values)  # and still readable: pages come back


# ---- the collective ops --------------------------------------------------------------------------

class Mirror:
    """A stand-in for two processes that hold the same values (so the meaning is known)."""
    rank, size = 0, 2

    def allreduce(self, x):
        return 2 * np.asarray(x, np.float32)

    def allgather(self, x, axis):
        return np.concatenate([x, -x], axis=axis)


def test_collectives_of_one_process_add_nothing_to_the_graph():
    x = Tensor(np.ones((2, 3), np.float32))
    assert x.allreduce(SINGLE) is x and x.allgather(SINGLE, axis=-1) is x


def test_collective_ops_run_between_kernels_and_on_replay(backend):
    group = Mirror()
    w = Tensor(np.random.default_rng(1).standard_normal((5, 4), dtype=np.float32)).realize()
    step = jit(lambda x: ((x @ w.transpose(0, 1)).allreduce(group) + 1).allgather(group, axis=1))
    for seed in range(3):  # capture, then replays with new values
        x = np.random.default_rng(seed).standard_normal((3, 4), dtype=np.float32)
        got = step(Tensor(x)).numpy()
        half = 2 * (x @ w.numpy().T) + 1
        np.testing.assert_allclose(got, np.concatenate([half, -half], axis=1), rtol=1e-6, atol=1e-6)


# ---- real processes ------------------------------------------------------------------------------

needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: pip install mpi4py mpich (the test extra does)")


def mpiexec(n: int, *args, timeout=300, env=None, input=None):
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, input=input)


@functools.cache
def alone(settings: str, dtype: str) -> tuple[list[np.ndarray], list[int]]:
    """One process's logits and greedy tokens (settings: a config as JSON), computed here."""
    return worker.steps(worker.random_model(json.loads(settings), dtype))


def split_run(tmp_path, n: int, *args) -> tuple[list[np.ndarray], list[int]]:
    out = tmp_path / f"ranks{n}.npz"
    result = mpiexec(n, str(WORKER), str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = np.load(out)
    return [saved[f"arr_{i}"] for i in range(worker.STEPS + 1)], saved["tokens"].tolist()


@needs_mpi
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("settings,dtype", [(GQA, "float32"), ({**GQA, "tied_embeddings": True}, "float32"),
                                            (GQA, "q8_0")], ids=["gqa-untied", "gqa-tied", "gqa-q8_0"])
def test_split_logits_equal_one_process(tmp_path, ranks, settings, dtype):
    want, want_tokens = alone(json.dumps(settings, sort_keys=True), dtype)
    got, tokens = split_run(tmp_path, ranks, "random", json.dumps(settings), dtype)
    for g, w in zip(got, want):  # the prefill, then every decode step
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= bound(settings, w)
    assert tokens == want_tokens


@needs_mpi
def test_a_gguf_file_splits_as_it_loads(tmp_path):
    config = LlamaConfig(**GQA)
    path = tmp_path / "q4_0.gguf"
    write_gguf(path, config, checkpoint.RandomArrays(config), dtype=dtypes.q4_0)
    want, want_tokens = worker.steps(load(str(path), context=64))
    got, tokens = split_run(tmp_path, 2, "file", str(path))
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= bound(GQA, w)
    assert tokens == want_tokens


# ---- the command line under mpiexec ---------------------------------------------------------------

GREEDY = ["--prompt", "the quick brown fox", "--raw", "--temperature", "0", "--max-tokens", "12"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The Llama 3.2 layout (2 key/value heads, tied head, the real tokenizer) at dim 64."""
    path = tmp_path_factory.mktemp("tp") / "tiny.gguf"
    assert make_checkpoint.main([str(path), "--size", "tiny", "--layout", "gguf"]) == 0
    return path


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "models.llama3", *args], capture_output=True, text=True,
                          timeout=timeout)


@needs_mpi
def test_the_command_line_split_over_two_ranks_prints_what_one_process_prints(tiny_gguf):
    alone = cli("--checkpoint", str(tiny_gguf), *GREEDY)
    split = mpiexec(2, "-m", "models.llama3", "--checkpoint", str(tiny_gguf), *GREEDY)
    assert alone.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == alone.stdout and alone.stdout.strip()  # rank 0 prints, once
    assert len(split.stderr.strip().splitlines()) == 1 and "decode" in split.stderr  # one stats line


@needs_mpi
def test_a_chat_split_over_ranks_reads_rank_0s_input(tiny_gguf):
    args = ["--checkpoint", str(tiny_gguf), "--chat", "--temperature", "0", "--max-tokens", "6"]
    turns = "hello\nand then\n\n"
    alone = subprocess.run([sys.executable, "-m", "models.llama3", *args], input=turns, capture_output=True,
                           text=True, timeout=300)
    split = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "models.llama3", *args], input=turns,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == alone.stdout and alone.stdout.count("> ") == 3


@needs_mpi
def test_a_model_that_does_not_split_is_one_line_and_every_rank_ends(tiny_gguf):
    result = mpiexec(3, "-m", "models.llama3", "--checkpoint", str(tiny_gguf), *GREEDY, timeout=120)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: Llama-3.2-tiny's 2 key/value heads do not split over 3 processes: run a number of "
                    "processes that divides 2 (its key/value heads)"], (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "MPI_Abort" not in result.stderr  # every rank ended as usual


@needs_mpi
def test_bad_input_on_rank_0_ends_every_rank_as_usual(tiny_gguf):
    """Rank 0 reads the input; its error reaches every rank, so that none waits for rank 0 in
    a collective and all exit as usual: an MPI abort could end mpirun before it had passed on
    what rank 0 printed."""
    result = mpiexec(2, "-m", "models.llama3", "--checkpoint", str(tiny_gguf), "--prompt", "-", "--raw",
                     input="  \n", timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == ["error: the prompt is empty: give some text"], result.stderr


@needs_mpi
def test_speculation_under_mpirun_is_one_line_and_every_rank_ends(tiny_gguf):
    """Each process would pace its drafts by its own clock, and the processes' passes must
    match: --lookup and --draft are refused under mpirun."""
    result = mpiexec(2, "-m", "models.llama3", "--checkpoint", str(tiny_gguf), *GREEDY, "--lookup", "4", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "leave them out under mpirun" in ours[0], result.stderr  # rank 0 alone says it


def _rank_pid(marker: str, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace") and \
                    f"PMI_RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


@needs_mpi
def test_a_rank_that_dies_ends_every_rank(tiny_gguf, tmp_path):
    marker = str(tmp_path / "marker")  # names this run's processes
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "models.llama3", "--checkpoint", str(tiny_gguf),
                            "--chat", "--system", marker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline, pid = time.monotonic() + 120, None
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.5)
            pid = _rank_pid(marker, 1)
        assert pid is not None, "rank 1 never started"
        time.sleep(5)  # both ranks loaded, rank 0 waiting for input, rank 1 for rank 0
        os.kill(pid, signal.SIGKILL)
        job.wait(timeout=60)  # no hang: rank 0 ends too
        assert job.returncode != 0
    finally:
        job.kill()
        job.communicate()


def test_under_mpirun_without_mpi_is_one_line():
    code = "import sys; sys.modules['mpi4py'] = None; from models.generation.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PMI_SIZE": "2", "PMI_RANK": "0"}
    result = subprocess.run([sys.executable, "-c", code, "--prompt", "hi"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: started by mpirun as 2 processes but MPI cannot be used")
    assert len(result.stderr.strip().splitlines()) == 1
    other = subprocess.run([sys.executable, "-c", code, "--prompt", "hi"], capture_output=True, text=True,
                           timeout=120, env={**env, "PMI_RANK": "1"})
    assert other.returncode == 2 and other.stderr == ""  # rank 0 alone speaks


def test_meta_shards_are_read_only_where_a_rank_takes_its_share(tmp_path):
    folder = tmp_path / "meta"  # Meta's model-parallel layout: two consolidated.NN.pth files
    assert make_checkpoint.main([str(folder), "--size", "tiny", "--layout", "meta", "--shards", "2",
                                 "--dtype", "float32"]) == 0
    _, whole, _ = checkpoint.load(folder)
    for rank in range(2):
        _, shards, _ = checkpoint.load(folder, part=(rank, 2))
        assert set(shards) == set(whole) | {"output.weight"}  # the tied head: this rank's embedding rows
        for name, t in shards.items():
            source = whole[name if name in whole else "tok_embeddings.weight"].numpy()
            want = tensor_parallel.shard(name, source, dtypes.float32, rank, 2)
            np.testing.assert_array_equal(t.numpy(), want)


@needs_mpi
def test_a_meta_folder_split_over_two_ranks_prints_what_one_process_prints(tmp_path):
    folder = tmp_path / "meta"
    assert make_checkpoint.main([str(folder), "--size", "tiny", "--layout", "meta", "--shards", "2"]) == 0
    alone = cli("--checkpoint", str(folder), *GREEDY)
    split = mpiexec(2, "-m", "models.llama3", "--checkpoint", str(folder), *GREEDY)
    assert alone.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == alone.stdout and alone.stdout.strip()
