"""The command line as a user meets it: bad input is one line on stderr and exit status 2."""
import subprocess
import sys

import pytest

from models.config import LlamaConfig
from models.gguf_writer import write_gguf
from tools import make_checkpoint

TINY = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=64, max_context=64)


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "models.llama3", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[0]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(path, TINY, make_checkpoint.random_arrays(TINY))
    return path


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run("--checkpoint", str(tmp_path / "nope")), "nope", "no such file")


def test_folder_without_a_checkpoint(tmp_path):
    assert_one_line_error(run("--checkpoint", str(tmp_path)), "no checkpoint here")


def test_truncated_safetensors(tmp_path):
    folder = tmp_path / "hf"
    make_checkpoint.write_hf(folder, TINY, make_checkpoint.random_arrays(TINY))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(run("--checkpoint", str(folder)), "truncated", "model.safetensors")
    assert weights.stat().st_size == len(data) - 1000  # nothing of the user's was touched


def test_truncated_gguf(tmp_path, tiny_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:5000])
    assert_one_line_error(run("--checkpoint", str(cut)), "cut.gguf")


def test_unknown_size():
    assert_one_line_error(run("--size", "2b"), "2b")


def test_prompt_longer_than_the_context(tiny_gguf):
    result = run("--checkpoint", str(tiny_gguf), "--raw", "--context", "8", "--prompt", "a b c d e f g h i j k l m")
    assert_one_line_error(result, "context")


def test_generates_from_a_checkpoint_and_reports_speed(tiny_gguf):
    result = run("--checkpoint", str(tiny_gguf), "--raw", "--prompt", "hello", "--max-tokens", "5",
                 "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "prefill" in result.stderr and "decode" in result.stderr and "tok/s" in result.stderr


def test_seed_makes_sampling_reproducible(tiny_gguf):
    args = ("--checkpoint", str(tiny_gguf), "--raw", "--prompt", "hello", "--max-tokens", "8", "--seed", "3",
            "--temperature", "1.0")
    assert run(*args).stdout == run(*args).stdout


def test_tokenize_tool_prints_ids_as_json(smollm2_path):
    result = subprocess.run([sys.executable, "-m", "tools.tokenize", str(smollm2_path), "Hello world"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[19556, 905]"


def test_tokenize_tool_llama3_tokenizer_model(llama3_tokenizer_path):
    result = subprocess.run([sys.executable, "-m", "tools.tokenize", str(llama3_tokenizer_path), "Hello world"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[9906, 1917]"


def test_a_base_model_without_a_template_completes_plainly(tiny_gguf):
    result = run("--checkpoint", str(tiny_gguf), "--prompt", "hello", "--max-tokens", "3", "--temperature", "0")
    assert result.returncode == 0, result.stderr
