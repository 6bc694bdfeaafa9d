"""llama.cpp's own tokenizer test suite (its `tests/test-tokenizer-0`): each
`ggml-vocab-NAME.gguf` vocabulary comes with `.inp` texts and the `.out` ids llama.cpp gives
them, tokenized without BOS and without parsing special tokens. Every case must match.

The files come from the llama-cpp-python sdist on PyPI (`python -m tools.fetch llamacpp-tests`),
not from this repository. llama-bpe is Llama 3's vocabulary, llama-spm Llama 2's SentencePiece;
the others use pre-tokenizers the loader accepts by name.
"""
import pytest

from models.formats.assets import LLAMACPP_VOCABS, fetch
from models.formats.checkpoint import load_tokenizer

pytestmark = pytest.mark.oracle

SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def vocab_folder():
    return fetch("llamacpp-tests") / "models"


def read_cases(folder, name) -> list[tuple[str, list[int]]]:
    texts = (folder / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    expected = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")[:len(texts)]
    assert len(texts) == len(expected) > 40, name
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(texts, expected)]


@pytest.mark.parametrize("name", LLAMACPP_VOCABS)
def test_every_case_of_llamacpp_vocab_suite(vocab_folder, name):
    tokenizer = load_tokenizer(vocab_folder / f"ggml-vocab-{name}.gguf")
    wrong = [(text, ids, tokenizer.encode(text, bos=False)) for text, ids in read_cases(vocab_folder, name)
             if tokenizer.encode(text, bos=False) != ids]
    assert not wrong, f"{len(wrong)} cases differ from llama.cpp, first: {wrong[0]}"


@pytest.mark.parametrize("name", LLAMACPP_VOCABS)
def test_llamacpp_vocab_suite_decodes_back_to_its_text(vocab_folder, name):
    tokenizer = load_tokenizer(vocab_folder / f"ggml-vocab-{name}.gguf")
    for text, ids in read_cases(vocab_folder, name):
        assert tokenizer.decode(ids) == text
