"""The command line as a user meets it: bad input is one line on stderr and exit status 2."""
import os
import subprocess
import sys

import pytest

from models.formats import checkpoint
from models.formats.gguf_writer import write_gguf
from models.llama3.config import LlamaConfig
from tools import make_checkpoint

pytestmark = pytest.mark.slow

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
    write_gguf(path, TINY, checkpoint.RandomArrays(TINY))
    return path


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run("--checkpoint", str(tmp_path / "nope")), "nope", "no such file")


def test_folder_without_a_checkpoint(tmp_path):
    assert_one_line_error(run("--checkpoint", str(tmp_path)), "no checkpoint here")


def test_truncated_safetensors(tmp_path):
    folder = tmp_path / "hf"
    make_checkpoint.write_hf(folder, TINY, checkpoint.RandomArrays(TINY))
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


def test_weights_quantised_at_load(tiny_gguf):
    """--dtype q4_0: a float16 file's matrices quantised in memory; the same greedy run works."""
    result = run("--checkpoint", str(tiny_gguf), "--raw", "--prompt", "hello", "--max-tokens", "5",
                 "--temperature", "0", "--dtype", "q4_0")
    assert result.returncode == 0, result.stderr
    assert "decode" in result.stderr
    assert_one_line_error(run("--checkpoint", str(tiny_gguf), "--dtype", "q3_k"), "invalid choice")


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


@pytest.mark.parametrize("option, value, words", [
    ("--temperature", "-1", [">= 0"]), ("--top-p", "2", ["(0, 1]"]), ("--top-p", "0", ["(0, 1]"]),
    ("--top-k", "-1", [">= 0"]), ("--top-k", "1.5", ["whole number"]), ("--min-p", "5", ["[0, 1)"]),
    ("--repetition-penalty", "0", ["> 0"]), ("--max-tokens", "-5", [">= 1"]), ("--max-tokens", "0", [">= 1"]),
    ("--context", "-5", [">= 1"]), ("--temperature", "nan", [">= 0"]), ("--prompt", "", ["empty"]),
    ("--prompt", "   ", ["empty"]), ("--seed", "x", ["int"]),
])
def test_each_option_out_of_range_is_one_line(tiny_gguf, option, value, words):
    assert_one_line_error(run("--checkpoint", str(tiny_gguf), option, value), option, *words)


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_gguf):
    result = subprocess.run([sys.executable, "-m", "models.llama3", "--checkpoint", str(tiny_gguf), "--prompt",
                             b"caf\xff".decode("utf-8", "surrogateescape")], capture_output=True, text=True)
    assert_one_line_error(result, "--prompt", "UTF-8")


@pytest.mark.parametrize("setting", ["0", "-2", "abc", "1.5"])
def test_bad_thread_counts_are_one_line(tiny_gguf, setting):
    result = subprocess.run([sys.executable, "-m", "models.llama3", "--checkpoint", str(tiny_gguf), "--max-tokens",
                             "2"], capture_output=True, text=True, env={**os.environ, "TT_THREADS": setting})
    assert_one_line_error(result, "TT_THREADS", setting)


def test_a_full_context_is_said(tiny_gguf):
    result = run("--checkpoint", str(tiny_gguf), "--raw", "--prompt", "hello", "--context", "12",
                 "--max-tokens", "500", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "context of 12 positions is full" in result.stderr


def test_a_closed_pipe_ends_quietly(tiny_gguf):
    command = [sys.executable, "-m", "models.llama3", "--checkpoint", str(tiny_gguf), "--raw", "--max-tokens", "200"]
    producer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    producer.stdout.read(5)
    producer.stdout.close()  # as `| head -c 5` does
    _, err = producer.communicate(timeout=300)
    assert producer.returncode == 0 and b"Error" not in err and b"error" not in err, err


def test_folder_with_weights_but_no_tokenizer(tmp_path):
    folder = tmp_path / "hf"
    make_checkpoint.write_hf(folder, TINY, checkpoint.RandomArrays(TINY))
    assert_one_line_error(run("--checkpoint", str(folder)), "no tokenizer", "tokenizer.json", "tokenizer.model")


def test_make_checkpoint_output_runs_as_it_is(tmp_path):
    for layout, out, dtype in [("hf", tmp_path / "hf", "bfloat16"), ("gguf", tmp_path / "m.gguf", "bfloat16"),
                               ("gguf", tmp_path / "q.gguf", "q4_0")]:
        made = subprocess.run([sys.executable, "-m", "tools.make_checkpoint", "--size", "tiny", "--layout", layout,
                               "--dtype", dtype, str(out)], capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr
        result = run("--checkpoint", str(out), "--max-tokens", "3", "--temperature", "0")
        assert result.returncode == 0 and "decode" in result.stderr, result.stderr


def test_make_checkpoint_block_types_are_gguf_only(tmp_path):
    made = subprocess.run([sys.executable, "-m", "tools.make_checkpoint", "--size", "tiny", "--layout", "hf",
                           "--dtype", "q4_0", str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert made.returncode == 2 and "use it with --layout gguf" in made.stderr
    assert "Traceback" not in made.stderr and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tool", ["tools.fetch", "tools.tokenize", "tools.make_checkpoint", "tools.bench", "tools.perplexity",
                                  "tools.bench_constraints",
                                  "models.llama3"])
def test_help_exits_cleanly(tool):
    result = subprocess.run([sys.executable, "-m", tool, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_bench_ops_runs_every_case_quickly():
    """tools.bench_ops --quick: every case runs and prints a positive rate (a smoke test, not
    a timing: the figures live in docs/performance.md)."""
    result = subprocess.run([sys.executable, "-m", "tools.bench_ops", "--quick", "--repeat", "1"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for case in ("float32", "bfloat16", "q4_0", "q8_0", "q4_k", "q6_k", "over 128 positions"):
        rates = [float(line.split()[-1]) for line in lines if line.startswith("  ") and case in line]
        assert rates and all(r > 0 for r in rates), (case, result.stdout)


def test_bench_server_measures_streams_and_first_tokens():
    """tools.bench_server on SmolLM2 as shipped, 1 and 2 streams of fresh prompts: each count
    prints a positive aggregate and the time to its last first token (a smoke test, not a
    timing: the figures live in docs/serving.md)."""
    result = subprocess.run([sys.executable, "-m", "tools.bench_server", "--streams", "1,2", "--tokens", "3",
                             "--repeat", "1", "--prompt-words", "8"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    ours = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("tinytensor")]
    assert [int(words[1]) for words in ours] == [1, 2], result.stdout
    for words in ours:  # tinytensor N streams: R tok/s aggregate (...), last first token after T ms
        assert float(words[3]) > 0 and float(words[-2]) > 0 and words[-1] == "ms", result.stdout


def test_ctrl_c_in_a_chat_stops_the_reply_not_the_chat(tmp_path):
    import signal
    import time
    model = tmp_path / "tiny.gguf"
    subprocess.run([sys.executable, "-m", "tools.make_checkpoint", "--size", "tiny", "--layout", "gguf", str(model)],
                   check=True, capture_output=True, timeout=300)
    chat = subprocess.Popen([sys.executable, "-m", "models.llama3", "--checkpoint", str(model), "--chat",
                             "--max-tokens", "100000", "--context", "100000", "--temperature", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chat.stdin.write(b"hello\n")
    chat.stdin.flush()
    seen = b""
    while len(seen) < 40:  # the prompt "> " and some of the reply
        seen += chat.stdout.read1(64)
    chat.send_signal(signal.SIGINT)
    time.sleep(1)
    out, err = chat.communicate(b"\n", timeout=300)  # an empty line ends the chat
    assert chat.returncode == 0, err
    assert b"stopped" in err and b"Traceback" not in err


def test_chat_with_a_model_that_has_no_chat_format(tiny_gguf):
    # a stand-in byte vocabulary: no chat template, no Llama 3 header tokens
    assert_one_line_error(run("--checkpoint", str(tiny_gguf), "--chat"), "no chat format", "plain completion")


def test_more_threads_than_any_machine_is_one_line(tiny_gguf):
    result = subprocess.run([sys.executable, "-m", "models.llama3", "--checkpoint", str(tiny_gguf), "--max-tokens",
                             "2"], capture_output=True, text=True, env={**os.environ, "TT_THREADS": "999999"})
    assert_one_line_error(result, "TT_THREADS", "from 1 to 512")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    from tests.tiny_checkpoint import write_tiny_hf
    template = ("{% if messages[-1]['content'] == 'raise' %}{{ raise_exception('no such turn') }}{% endif %}"
                "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}<s>")
    return write_tiny_hf(tmp_path_factory.mktemp("chat") / "hf", template)


def test_a_template_that_raises_is_one_line(tiny_chat):
    assert_one_line_error(run("--checkpoint", str(tiny_chat), "--prompt", "raise"), "chat template failed",
                          "no such turn")


def test_bytes_that_are_not_utf8_do_not_end_a_chat(tiny_chat):
    chat = subprocess.run([sys.executable, "-m", "models.llama3", "--checkpoint", str(tiny_chat), "--chat",
                           "--max-tokens", "2"], input=b"caf\xff\nsecond\n\n", capture_output=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count(b"> ") == 3  # two replies, then the empty line ends it
    assert b"Traceback" not in chat.stderr


def test_an_unknown_target_is_one_line(tiny_gguf):
    result = subprocess.run([sys.executable, "-m", "models.llama3", "--checkpoint", str(tiny_gguf), "--max-tokens",
                             "2"], capture_output=True, text=True, env={**os.environ, "TT_TARGET": "avx9000"})
    assert_one_line_error(result, "TT_TARGET", "avx9000", "avx2")


def test_every_error_a_user_can_cause_has_one_base():
    """A command catches UserError (with ValueError and OSError) and prints its one line."""
    from models.formats.assets import FetchError
    from models.text.chat import ChatTemplateError
    from models.llama3.config import ConfigError
    from models.llama3.images import ImageError
    from models.text.tokenizer import TokenizerError
    from tinytensor.distributed import DistributedError
    from tinytensor.errors import UserError
    from tinytensor.state import CheckpointError
    from tools.eval.data import DataError
    for error in (CheckpointError, TokenizerError, ConfigError, ImageError, FetchError, ChatTemplateError, DataError,
                  DistributedError):
        assert issubclass(error, UserError), error


def test_each_console_script_names_a_command():
    """pyproject's [project.scripts] (tinytensor-llama, tinytensor-server, ...) point at callables."""
    import importlib
    import tomllib
    from pathlib import Path
    scripts = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"tinytensor-llama", "tinytensor-server", "tinytensor-quantize", "tinytensor-eval"} <= set(scripts)
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target


# ---- where the prompt comes from, and where a reply stops ----------------------------------------

def greedy(*args, **kw):
    return subprocess.run([sys.executable, "-m", "models.llama3", "--temperature", "0", "--max-tokens", "12", *args],
                          capture_output=True, text=True, timeout=300, **kw)


def test_the_prompt_from_a_pipe_a_file_or_prompt_dash(smollm2_path, tmp_path):
    """`echo ... | python -m models.llama3` answers what was piped, as --prompt, --file and
    `--prompt -` do; with no stdin data it is the default question."""
    model, question = ["--checkpoint", str(smollm2_path)], "Name a colour."
    want = greedy(*model, "--prompt", question)
    assert want.returncode == 0, want.stderr
    (tmp_path / "q.txt").write_text(question, encoding="utf-8")
    for got in (greedy(*model, input=question), greedy(*model, "--prompt", "-", input=question),
                greedy(*model, "--file", str(tmp_path / "q.txt"))):
        assert got.returncode == 0 and got.stdout == want.stdout, got.stderr
    default = greedy(*model)  # stdin is /dev/null here (tests/conftest.py)
    assert default.stdout == greedy(*model, "--prompt", "What is the capital of France? Answer in one sentence.").stdout
    assert default.stdout != want.stdout


def test_stop_ends_a_reply_before_its_text(smollm2_path):
    model = ["--checkpoint", str(smollm2_path), "--prompt", "Count from 1 to 10, separated by commas."]
    whole = greedy(*model, "--max-tokens", "30").stdout
    assert "5" in whole
    cut = greedy(*model, "--max-tokens", "30", "--stop", "5", "--stop", "never there")
    assert cut.returncode == 0 and cut.stdout == whole[:whole.index("5")] + "\n"


@pytest.mark.parametrize("args, words", [
    (["--chat", "--prompt", "hi"], ["--chat reads your messages"]),
    (["--raw", "--system", "be brief"], ["--system needs the chat template"]),
    (["--prompt", "hi", "--file", "q.txt"], ["--prompt or --file"]),
    (["--stop", "x"] * 17, ["at most 16"]),
    (["--file", "/nonexistent/q.txt"], ["q.txt", "missing"]),
])
def test_options_that_would_be_ignored_are_refused(tiny_gguf, args, words):
    assert_one_line_error(run("--checkpoint", str(tiny_gguf), *args), *words)


def test_json_schema_and_grammar_shape_the_reply(smollm2_path, tmp_path):
    """--json-schema(-file): the reply is JSON valid for the schema; --grammar(-file): it matches
    the GBNF; a bad one is one line before the model loads."""
    jsonschema = pytest.importorskip("jsonschema", reason="the jsonschema oracle is a test dependency")
    import json
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 130}},
              "required": ["name", "age"], "additionalProperties": False}
    model = ["--checkpoint", str(smollm2_path), "--prompt", "A 30 year old named Bob, as JSON.", "--max-tokens", "60"]
    inline = greedy(*model, "--json-schema", json.dumps(schema))
    assert inline.returncode == 0, inline.stderr
    jsonschema.validate(json.loads(inline.stdout), schema)
    (tmp_path / "person.json").write_text(json.dumps(schema), encoding="utf-8")
    assert greedy(*model, "--json-schema-file", str(tmp_path / "person.json")).stdout == inline.stdout
    (tmp_path / "yes.gbnf").write_text('root ::= ("yes" | "no") "."\n', encoding="utf-8")
    for shape in (["--grammar", 'root ::= ("yes" | "no") "."'], ["--grammar-file", str(tmp_path / "yes.gbnf")]):
        answer = greedy("--checkpoint", str(smollm2_path), "--prompt", "Is Paris in France?", *shape)
        assert answer.returncode == 0 and answer.stdout in ("yes.\n", "no.\n"), answer.stderr


@pytest.mark.parametrize("args, words", [
    (["--json-schema", '{"type": "object"'], ["JSON schema is not valid JSON"]),
    (["--json-schema", '{"type": "objec"}'], ["JSON schema cannot be used", "objec"]),
    (["--grammar", "root ::= missing"], ["grammar cannot be read", "missing"]),
    (["--grammar-file", "/nonexistent/g.gbnf"], ["g.gbnf", "missing"]),
    (["--json-schema", "{}", "--grammar", 'root ::= "a"'], ["a reply has one shape"]),
])
def test_a_bad_schema_or_grammar_is_one_line(tiny_gguf, args, words):
    assert_one_line_error(run("--checkpoint", str(tiny_gguf), *args), *words)


def test_speculation_gives_the_same_reply(smollm2_path):
    """--lookup and --draft: the reply of plain decoding, and the stats line counts the drafts."""
    model = ["--checkpoint", str(smollm2_path), "--max-tokens", "40",
             "--prompt", "Repeat exactly: the clocks were striking thirteen, and the clocks were striking thirteen."]
    want = greedy(*model)
    assert want.returncode == 0, want.stderr
    for extra in (["--lookup", "6"], ["--draft", str(smollm2_path), "--draft-max", "4"]):
        got = greedy(*model, *extra)
        assert got.returncode == 0 and got.stdout == want.stdout, got.stderr
        assert "drafted" in got.stderr and "accepted" in got.stderr


@pytest.mark.parametrize("extra, words", [
    (["--lookup", "4", "--draft", "x.gguf"], ["--lookup or --draft"]),
    (["--lookup", "0"], ["--lookup", "too small"]),
    (["--image", "a.png", "--lookup", "4"], ["leave them out with --image"]),
])
def test_bad_speculation_options_are_one_line(tiny_gguf, extra, words):
    assert_one_line_error(run("--checkpoint", str(tiny_gguf), *extra), *words)


def test_a_draft_with_another_vocabulary_is_one_line(smollm2_path, tiny_gguf):
    assert_one_line_error(run("--checkpoint", str(smollm2_path), "--draft", str(tiny_gguf), "--max-tokens", "2"),
                          "vocabulary differs", "tokenizer")
