"""tools.quantize writes what llama-quantize writes: the same type for every tensor of every file
type (llama.cpp's mixes and fallbacks), the same bytes where the quantiser is the same (the
simple formats, the float types; our K-quant quantiser is not llama.cpp's search), a file that
llama.cpp loads and scores as we do; and it never loses what the user had."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.formats import checkpoint, quant_mix
from models.formats.gguf_writer import write_gguf
from models.llama3.config import SIZES, LlamaConfig
from ops import dtypes
from tinytensor.state import gguf_file
from tools import quantize

from tests.reference import perplexities
from tests.integration.test_cli import assert_one_line_error

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, "-m", "tools.quantize", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def type_counts(config: LlamaConfig, file_type: str) -> dict[str, int]:
    mix = quant_mix.FILE_TYPES[file_type]
    counts = {}
    for name, shape in checkpoint.expected_shapes(config).items():
        t = mix.tensor_type(name, shape, config).name
        counts[t] = counts.get(t, 0) + 1
    return counts


def test_published_shapes_get_llama_quantize_counts():
    """As llama-quantize's logs report them for these files: the 1B Q4_K_M made here from the 1B
    shape (96 q4_K, 17 q6_K), and the well-known 8B Q4_K_M (193 q4_K, 33 q6_K; its F32 count
    includes rope_freqs, which is not a Meta weight)."""
    assert type_counts(SIZES["1b"], "q4_k_m") == {"q4_k": 96, "q6_k": 17, "float32": 33}
    assert type_counts(SIZES["8b"], "q4_k_m") == {"q4_k": 193, "q6_k": 33, "float32": 65}
    assert type_counts(SIZES["8b"], "q4_0") == {"q4_0": 225, "q6_k": 1, "float32": 65}  # the head
    assert type_counts(SIZES["8b"], "q8_0") == {"q8_0": 226, "float32": 65}
    assert type_counts(SIZES["70b"], "q4_k_m")["q5_k"] == 40  # 70B's attn_v outside the 40 more-bits layers


def shapes_config(dim: int, tied: bool) -> LlamaConfig:
    """A random model of 8 layers whose rows are `dim` (256: whole super-blocks; 160: K-quants
    fall back), ffn rows 2 * dim."""
    return LlamaConfig(dim=dim, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=2 * dim,
                       max_context=64, tied_embeddings=tied)


@pytest.fixture(scope="module", params=[(256, True), (256, False), (160, True)], ids=["tied", "untied", "fallback"])
def f32_gguf(request, tmp_path_factory):
    config = shapes_config(*request.param)
    path = tmp_path_factory.mktemp("quantize") / "f32.gguf"
    write_gguf(path, config, checkpoint.RandomArrays(config), dtype=dtypes.float32)
    return path


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0", "q5_1", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                                       "f16", "bf16"])
def test_every_tensor_gets_llama_quantize_type(llamacpp_bin, f32_gguf, tmp_path, file_type):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    assert quantize.main([str(f32_gguf), str(ours), "--type", file_type]) == 0
    done = subprocess.run([str(llamacpp_bin / "llama-quantize"), str(f32_gguf), str(theirs), file_type.upper()],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (our_meta, mine), (their_meta, other) = gguf_file.read(ours), gguf_file.read(theirs)
    assert our_meta["general.file_type"] == their_meta["general.file_type"]
    assert set(mine) == set(other)
    for name, (raw, dt) in mine.items():
        assert dt == other[name][1], name
        if not dt.block or dt.block.values == 32:  # the same quantiser: the same bytes
            assert np.array_equal(raw, other[name][0]), name


@pytest.mark.parametrize("layout, file_type, dtype", [("hf", "q4_0", "q4_0"), ("meta", "q4_0", "q4_0"),
                                                     ("hf", "q4_k_s", "q4_k")])
def test_a_folder_quantises_to_the_blocks_of_quantising_at_load(tmp_path, layout, file_type, dtype):
    """From a bf16 folder, tensor by tensor, to the very blocks load(dtype=...) makes in memory,
    with the folder's tokenizer and chat template (q4_k: the tiny model's rows of 64 and 192
    values are no whole super-blocks, and both fall back to q5_0, as llama-quantize does)."""
    folder = tmp_path / layout
    made = subprocess.run([sys.executable, "-m", "tools.make_checkpoint", "--size", "tiny", "--layout", layout,
                           "--dtype", "bfloat16", str(folder)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert made.returncode == 0, made.stderr
    out = tmp_path / f"{file_type}.gguf"
    done = run(folder, out, "--type", file_type, "--pure")
    assert done.returncode == 0, done.stderr
    assert f"{file_type.upper()} (pure)" in done.stderr
    config, weights, tokenizer = checkpoint.load(out)
    want_config, want, want_tokenizer = checkpoint.load(folder, dtype=dtype)
    assert config.n_layers == want_config.n_layers and config.tied_embeddings == want_config.tied_embeddings
    assert set(weights) == set(want)
    for name, w in weights.items():  # the norms: float32 in a GGUF file, bf16 in the folder, the same values
        assert (w.dtype == want[name].dtype or w.ndim == 1) and np.array_equal(w.numpy(), want[name].numpy()), name
    text = "Quantised: 1.5 bits? No, 4½."
    assert tokenizer.encode(text, bos=True) == want_tokenizer.encode(text, bos=True)
    assert tokenizer.chat_template == want_tokenizer.chat_template


def test_requantising_asks_first_and_writes_nothing(smollm2_path, tmp_path):
    out = tmp_path / "q4_0.gguf"
    assert_one_line_error(run(smollm2_path, out, "--type", "q4_0"), "already quantised", "--allow-requantize")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_arguments_are_one_line_and_overwrite_nothing(smollm2_path, tmp_path):
    existing = tmp_path / "mine.gguf"
    existing.write_bytes(b"the user's file")
    assert_one_line_error(run(smollm2_path, existing, "--type", "q8_0"), "exists")
    assert existing.read_bytes() == b"the user's file"
    assert_one_line_error(run(smollm2_path, tmp_path / "x.gguf", "--type", "q3_k"), "invalid choice")
    assert_one_line_error(run(smollm2_path, tmp_path / "no" / "x.gguf", "--type", "q8_0"), "no such folder")
    assert_one_line_error(run(tmp_path / "missing", tmp_path / "x.gguf", "--type", "q8_0"), "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.gguf"]


def test_a_write_that_fails_midway_leaves_no_file(tmp_path):
    config = shapes_config(256, True)

    class Failing(checkpoint.RandomArrays):
        def __getitem__(self, name):
            if name.startswith("layers.5"):
                raise OSError("the disk is full")
            return super().__getitem__(name)
    with pytest.raises(OSError):
        write_gguf(tmp_path / "m.gguf", config, Failing(config), dtype=dtypes.q8_0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("file_type", ["q8_0", "q4_k_m"])
def test_llama_perplexity_scores_our_file_as_we_do(llamacpp_bin, smollm2_path, tmp_path, file_type):
    """A real model (SmolLM2), requantised by us: llama-perplexity reads our file (a simple
    format; our K-quant blocks mixed with q5_0 and q8_0 fallbacks) and scores it within the
    issue's 0.5% of our own figure on the same text (llama.cpp's own build notes, 10 chunks of
    512: 2,560 scored tokens). Both sides round activations to 8 bits, a step function: float
    differences of 1e-7 flip some steps, and from there the two runs differ like two draws of the
    8-bit noise (as our two backends do), which averages out over the scored tokens: 0.26% here
    (q8_0), 0.07% over 4,800 tokens."""
    out = tmp_path / f"{file_type}.gguf"
    assert run(smollm2_path, out, "--type", file_type, "--allow-requantize").returncode == 0
    text = llamacpp_bin.parents[1] / "docs" / "build.md"
    (ppl, _), (their_ppl, _) = perplexities(out, text, llamacpp_bin, 512, 10)
    assert abs(ppl - their_ppl) <= 0.005 * their_ppl, (ppl, their_ppl)


def file_size_limit(limit: int):
    """A child process whose files cannot grow past `limit` bytes: writes then fail as on a full
    disk (Python ignores SIGXFSZ, so the write raises instead of killing the process)."""
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_leaves_the_users_files_as_they_were(smollm2_path, tmp_path):
    mine = {"out.gguf.partial": b"the user's notes", "other.gguf": b"another of the user's files"}
    for name, content in mine.items():
        (tmp_path / name).write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "tools.quantize", str(smollm2_path), str(tmp_path / "out.gguf"),
                           "--type", "q8_0", "--allow-requantize"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, preexec_fn=file_size_limit(1 << 20))
    assert_one_line_error(done, "File too large")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == mine  # no out.gguf, nothing half-written


def test_a_fixed_partial_name_is_never_used(smollm2_path, tmp_path):
    """A user's OUT.partial survives, and a link there to the source (which a fixed name would
    have written through, truncating the source) changes nothing."""
    (tmp_path / "out.gguf.partial").symlink_to(smollm2_path)
    before = smollm2_path.stat().st_size
    done = run(smollm2_path, tmp_path / "out.gguf", "--type", "q8_0", "--allow-requantize")
    assert done.returncode == 0, done.stderr
    assert smollm2_path.stat().st_size == before and (tmp_path / "out.gguf.partial").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "out.gguf.partial"]


def test_an_output_that_is_a_link_is_never_written_through(smollm2_path, tmp_path):
    (tmp_path / "to-source.gguf").symlink_to(smollm2_path)
    (tmp_path / "dangling.gguf").symlink_to(tmp_path / "nowhere.gguf")
    before = smollm2_path.read_bytes()[:4096]
    for name in ("to-source.gguf", "dangling.gguf"):
        assert_one_line_error(run(smollm2_path, tmp_path / name, "--type", "q8_0", "--allow-requantize"), "exists")
    assert smollm2_path.read_bytes()[:4096] == before and not (tmp_path / "nowhere.gguf").exists()
