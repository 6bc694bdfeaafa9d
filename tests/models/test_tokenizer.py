"""Tokenizers against independent references: the Llama 3 tokenizer against Hugging Face's
Rust BPE built from the same tokenizer.model (transformers' TikTokenConverter), and the GGUF
byte-level BPE against transformers' tokenizer for the same GGUF file."""
import time

import pytest
from hypothesis import given, settings, strategies as st

from models.formats.gguf import read_tokenizer as gguf_tokenizer
from models.text.chat import chat_tokens, llama3_tokens
from models.text.tokenizer import LLAMA3_PATTERN, Llama3Tokenizer, StreamDecoder
from tinytensor.state import gguf_file

pytestmark = [pytest.mark.slow, pytest.mark.oracle]

TRICKY = ["Hello", " world", "  ", "\n\n", "\t", "\r\n", "123456789", "3.14159", "😀", "👩‍👩‍👧", "数字",
          "naïve", "ÅÅ", "'s", "'LL", "don't", "def f(x):\n    return x**2", "<|eot_id|>", "\u200b",
          "     leading", "trailing     ", "a" * 50, "!!!???", "עברית", "русский", "🇫🇷"]
texts = st.lists(st.one_of(st.sampled_from(TRICKY),
                           st.text(st.characters(exclude_categories=("Cs",)), max_size=30)),
                 max_size=12).map("".join)


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_path):
    return Llama3Tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def llama3_oracle(llama3, llama3_tokenizer_path):
    from transformers.convert_slow_tokenizer import TikTokenConverter
    names = sorted(llama3.special, key=llama3.special.get)
    oracle = TikTokenConverter(vocab_file=str(llama3_tokenizer_path), pattern=LLAMA3_PATTERN,
                               extra_special_tokens=names).converted()
    oracle.encode_special_tokens = True  # special-token text is plain text, as in Meta's encode
    return Oracle(lambda text: oracle.encode(text, add_special_tokens=False).ids)


class Oracle:
    """A reference encoder with a short repr, so that a failing example prints readably."""
    def __init__(self, encode):
        self.encode = encode

    def __repr__(self):
        return "<reference tokenizer>"


@given(text=texts)
@settings(max_examples=200)
def test_llama3_encode_matches_reference(llama3, llama3_oracle, text):
    assert llama3.encode(text) == llama3_oracle.encode(text)
    assert llama3.decode(llama3.encode(text)) == text


def test_llama3_special_tokens(llama3):
    assert llama3.vocab_size == 128256
    assert llama3.encode("hi", bos=True, eos=True)[::2] == [128000, 128001]
    assert llama3.encode("<|eot_id|>", allow_special=True) == [128009]
    assert 128009 not in llama3.encode("<|eot_id|>")  # plain text unless allowed
    assert llama3.special["<|reserved_special_token_245|>"] == 128255


def test_llama3_very_long_runs_are_cut_and_round_trip(llama3):
    text = " " * 60_000 + "x" * 60_000 + "\n" * 10
    start = time.perf_counter()
    ids = llama3.encode(text)
    assert time.perf_counter() - start < 30  # quadratic regex behaviour would take minutes
    assert llama3.decode(ids) == text


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    metadata, _ = gguf_file.read(smollm2_path)
    return gguf_tokenizer(smollm2_path, metadata)


@pytest.fixture(scope="module")
def smollm2_oracle(smollm2_path):
    """transformers' tokenizer for the GGUF, with SmolLM2's published pre-tokenizer. The GGUF
    names it `smollm` (llama.cpp: each digit alone, then GPT-2's regex), exactly what SmolLM2's
    tokenizer.json says; transformers' GGUF converter ignores that name and uses ByteLevel alone,
    which tokenizes "  12" differently from the model's own tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    oracle = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    oracle.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    oracle.__class__.__repr__ = lambda self: "<transformers tokenizer of the GGUF>"
    return oracle


@given(text=texts)
@settings(max_examples=200)
def test_gguf_bpe_encode_matches_transformers(smollm2, smollm2_oracle, text):
    ids = smollm2.encode(text, bos=False)
    assert ids == smollm2_oracle.encode(text, add_special_tokens=False)
    assert smollm2.decode(ids) == smollm2_oracle.decode(ids)


@given(text=texts)
def test_streaming_decode_never_splits_a_character(smollm2, llama3, text):
    for tok in (smollm2, llama3):
        ids = tok.encode(text)
        decoder = StreamDecoder(tok)
        pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert "\ufffd" not in "".join(pieces) or "\ufffd" in tok.decode(ids)


CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another, with an emoji 🎨?"}]


@pytest.mark.parametrize("turns", [1, 2, 4])
def test_gguf_chat_template_renders_as_transformers(smollm2, smollm2_oracle, turns):
    messages = CONVERSATION[-turns:] if turns != 2 else CONVERSATION[:2]
    want = smollm2_oracle.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert smollm2.decode(chat_tokens(smollm2, messages)) == want
    assert chat_tokens(smollm2, messages) == smollm2_oracle.encode(want, add_special_tokens=False)


def test_llama3_chat_format_is_metas(llama3):
    ids = llama3_tokens(llama3, CONVERSATION[:2])
    assert llama3.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse."
                                  "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
                                  "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids[0] == 128000 and ids.count(128006) == 3


@pytest.fixture(scope="module")
def hf_tokenizer_folder(smollm2_oracle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    smollm2_oracle.save_pretrained(folder)  # tokenizer.json + tokenizer_config.json, as HF folders hold
    return folder


@given(text=texts)
def test_tokenizer_json_matches_transformers(hf_tokenizer_folder, smollm2_oracle, text):
    from models.formats.hf import tokenizer_json
    ours = tokenizer_json(hf_tokenizer_folder)
    assert ours.encode(text, bos=False) == smollm2_oracle.encode(text, add_special_tokens=False)


def test_bytes_without_a_token_are_dropped_before_merging(smollm2, smollm2_oracle):
    text = "\U0006fa03\U0007d000"  # 0xF1 has no token in SmolLM2's vocabulary
    assert smollm2.encode(text, bos=False) == smollm2_oracle.encode(text, add_special_tokens=False)
