"""GGUF in llama.cpp's own layout, held against transformers on the same weights.

A random Llama 3 checkpoint (the real 128,256-token vocabulary, RoPE scaling with factor 8 and
32) is saved by transformers, then turned into GGUF twice: by llama.cpp's converter
(`convert_hf_to_gguf.py`, from the llama-cpp-python sdist) and by our writer. Both files must
give transformers' logits over a prompt long enough that the scaling decides them; our file
must hold what the converter's holds; and, where llama.cpp is built, llama.cpp must run ours.

Tolerance: 1e-4 on logits, float32 on both sides, as in test_llama: the sums differ only in
order (~1e-6 here); the unscaled RoPE this file once read moves them by more than 1e-2.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="PyTorch is a test oracle: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test oracle: pip install -e '.[test]'")
from transformers import LlamaConfig as HFConfig, LlamaForCausalLM  # noqa: E402

from models.formats import checkpoint
from models.formats.gguf_writer import write_gguf
from models.llama3 import Llama
from models.llama3.config import from_gguf
from ops import dtypes
from tests.reference import nmse, q8_nmse_per_product, quantised_products_on_path
from tinytensor import Tensor
from tinytensor.state import gguf_file

pytestmark = [pytest.mark.slow, pytest.mark.oracle]

TOL = 1e-4
PROMPT = np.random.default_rng(0).integers(0, 128000, 300).tolist()
# A short original context puts most of the 8 frequency pairs of a 16-wide head in the scaled
# or interpolated bands, so the scaling changes every logit within these 300 positions.
SCALINGS = {"factor8": 8.0, "factor32": 32.0}


def llama3_tokenizer_files(folder, tokenizer_model):
    """tokenizer.json + tokenizer_config.json as Meta's Llama 3 HF folders have them: the
    tiktoken ranks as byte-level BPE, Llama 3's split, a BOS put first by the post-processor."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from models.text.tokenizer import LLAMA3_PATTERN, Llama3Tokenizer

    specials = sorted(Llama3Tokenizer(tokenizer_model).special.items(), key=lambda item: item[1])
    fast = TikTokenConverter(vocab_file=str(tokenizer_model), pattern=LLAMA3_PATTERN,
                             extra_special_tokens=[name for name, _ in specials]).converted()
    fast.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])
    hf = PreTrainedTokenizerFast(tokenizer_object=fast, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")
    hf.save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, llama3_tokenizer_path, llamacpp_sources):
    """scaling name -> (HF folder, transformers' logits for PROMPT, the converter's GGUF, ours),
    each made once for every backend's tests."""
    made = {}

    def get(scaling: str):
        if scaling not in made:
            folder, logits = hf_checkpoint(tmp_path_factory.mktemp(scaling), SCALINGS[scaling], llama3_tokenizer_path)
            made[scaling] = (folder, logits, convert(folder, llamacpp_sources), write_ours(folder))
        return made[scaling]
    return get


def hf_checkpoint(folder, factor: float, tokenizer_model):
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009,
                   rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # O(1) activations, so a wrong formula shows up in the logits
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
        logits = model(torch.tensor([PROMPT])).logits[0].numpy()
    model.save_pretrained(folder)
    llama3_tokenizer_files(folder, tokenizer_model)
    return folder, logits


def convert(folder, llamacpp_sources):
    """The checkpoint as llama.cpp's converter writes it (F32)."""
    out = folder / "converted.gguf"
    env = {**os.environ, "PYTHONPATH": str(llamacpp_sources / "gguf-py")}
    done = subprocess.run([sys.executable, str(llamacpp_sources / "convert_hf_to_gguf.py"), str(folder),
                           "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def write_ours(folder):
    config, weights, tokenizer = checkpoint.load(folder)
    out = folder / "ours.gguf"
    write_gguf(out, config, {name: w.numpy() for name, w in weights.items()}, tokenizer, dtypes.float32)
    return out


@pytest.mark.parametrize("scaling", SCALINGS)
def test_converter_gguf_gives_transformers_logits(backend, checkpoints, scaling):
    _, want, converted, _ = checkpoints(scaling)
    assert np.abs(Llama(*checkpoint.load(converted)).logits(PROMPT) - want).max() <= TOL


@pytest.mark.parametrize("scaling", SCALINGS)
def test_our_gguf_gives_transformers_logits(backend, checkpoints, scaling):
    _, want, _, ours = checkpoints(scaling)
    assert np.abs(Llama(*checkpoint.load(ours)).logits(PROMPT) - want).max() <= TOL


def test_rope_scaling_decides_these_logits(checkpoints):
    """Without the rope_freqs factors the same file would be far off: the tests above have teeth."""
    from dataclasses import replace
    _, want, converted, _ = checkpoints("factor8")
    config, weights, tokenizer = checkpoint.load(converted)
    assert config.rope_freq_factors is not None and max(config.rope_freq_factors) == 8
    unscaled = Llama(replace(config, rope_freq_factors=None), weights, tokenizer)
    assert np.abs(unscaled.logits(PROMPT) - want).max() > 100 * TOL


@pytest.mark.parametrize("scaling", SCALINGS)
def test_our_gguf_holds_what_the_converter_writes(checkpoints, scaling):
    _, _, converted, ours = checkpoints(scaling)
    theirs, their_tensors = gguf_file.read(converted)
    mine, my_tensors = gguf_file.read(ours)
    incidental = {"general.name", "general.size_label", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token"}
    for key in set(theirs) - incidental:
        assert key in mine, key
        assert mine[key] == theirs[key], key
    assert set(my_tensors) == set(their_tensors)
    for name, (array, dtype) in their_tensors.items():
        assert my_tensors[name][1] == dtype and my_tensors[name][0].shape == array.shape, name
        # rope_freqs: the converter derives the factors in float32, we in float64 then round
        np.testing.assert_allclose(my_tensors[name][0], array, rtol=2.0**-23 if name == "rope_freqs.weight" else 0)


def test_gguf_tokenizer_matches_the_hf_folders(checkpoints):
    folder, _, _, ours = checkpoints("factor32")
    hf, gguf = checkpoint.load_tokenizer(folder), checkpoint.load_tokenizer(ours)
    for text in ["Cửa Việt", "Hello world", "  3333 tokens\n\n<|eot_id|>", "naïve 😶‍🌫️ ...!!"]:
        assert gguf.encode(text) == hf.encode(text)
        assert gguf.encode(text, allow_special=True) == hf.encode(text, allow_special=True)
    assert gguf.encode("x")[0] == 128000 and gguf.chat_template == hf.chat_template


def test_rope_keys_this_project_wrote_before_still_load():
    meta = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
            "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.vocab_size": 300,
            "llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 32.0,
            "llama.rope.scaling.original_context_length": 64}
    config = from_gguf(meta)
    assert config.rope_scaling.factor == 32.0 and config.rope_scaling.original_context == 64
    assert config.rope_freq_factors is None


def test_linear_rope_scaling_divides_every_frequency():
    meta = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
            "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.vocab_size": 300}
    assert from_gguf({**meta, "llama.rope.scale_linear": 4.0}).rope_freq_factors == (4.0,) * 8
    assert from_gguf({**meta, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}) \
        .rope_freq_factors == (2.0,) * 8
    with pytest.raises(ValueError, match="yarn"):
        from_gguf({**meta, "llama.rope.scaling.type": "yarn"})


def test_llamacpp_runs_our_gguf_and_agrees(checkpoints, llamacpp_bin, tmp_path):
    """llama.cpp loads, quantizes and greedily continues our file as we do (same argmax at
    every step: the same text)."""
    our_gguf = checkpoints("factor32")[3]
    quantized = subprocess.run([str(llamacpp_bin / "llama-quantize"), str(our_gguf), str(tmp_path / "q8.gguf"),
                                "Q8_0"], capture_output=True, text=True)
    assert quantized.returncode == 0, quantized.stderr[-2000:]
    prompt, n = "The capital of France is", 8
    done = subprocess.run([str(llamacpp_bin / "llama-simple"), "-m", str(our_gguf), "-n", str(n), prompt],
                          capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    model = Llama(*checkpoint.load(our_gguf))
    ids = model.tokenizer.encode(prompt)
    logits, generated = model.logits(ids), []
    for _ in range(n):  # greedy, recomputing the prefill: the plainest statement of argmax decoding
        generated.append(int(np.argmax(logits[-1])))
        logits = model.logits(ids + generated)
    text = b"".join(model.tokenizer.token_bytes(i) for i in generated)  # llama.cpp prints raw bytes
    assert done.stdout.endswith(text + b"\n"), (done.stdout, generated)


@pytest.mark.parametrize("dtype", [d for d in dtypes.BLOCKS if d.block.values == 32], ids=lambda d: d.name)
def test_llamacpp_quantized_file_is_computed_as_stored(backend, checkpoints, llamacpp_bin, tmp_path, dtype):
    """llama-quantize's blocks (every tensor, --pure) load as stored and give the logits of the
    same blocks dequantised to float32, but for the activations' 8-bit rounding (as in
    test_llama's quantised test)."""
    out = tmp_path / f"{dtype.name}.gguf"
    done = subprocess.run([str(llamacpp_bin / "llama-quantize"), "--pure", str(checkpoints("factor32")[2]), str(out),
                           dtype.name.upper()], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    config, weights, tokenizer = checkpoint.load(out)
    assert {w.dtype for name, w in weights.items() if name.endswith("wq.weight")} == {dtype}
    want = Llama(config, {k: Tensor(w.numpy()) for k, w in weights.items()}).logits(PROMPT[:64])
    got = Llama(config, weights).logits(PROMPT[:64])
    assert nmse(got, want) <= quantised_products_on_path(config.n_layers) * q8_nmse_per_product(32)


def k_quant_sized(tmp_path):
    """Our float32 GGUF of a random model whose rows are whole K-quant super-blocks (256)."""
    from models.llama3.config import LlamaConfig
    config = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=512, max_context=64)
    write_gguf(tmp_path / "f32.gguf", config, checkpoint.RandomArrays(config), dtype=dtypes.float32)
    return tmp_path / "f32.gguf"


@pytest.mark.parametrize("ftype, kinds", [("Q4_K_M", {dtypes.q4_k, dtypes.q6_k}), ("Q5_K_M", {dtypes.q5_k, dtypes.q6_k}),
                                          ("Q6_K", {dtypes.q6_k})])
def test_llamacpp_k_quant_file_is_computed_as_stored(backend, llamacpp_bin, tmp_path, ftype, kinds):
    """The files people download most: llama-quantize's Q4_K_M (and Q5_K_M, Q6_K) mix of
    K-quants load as stored and give the logits of the same blocks dequantised to float32, but
    for the activations' 8-bit rounding (as in test_llama's quantised test)."""
    out = tmp_path / f"{ftype}.gguf"
    done = subprocess.run([str(llamacpp_bin / "llama-quantize"), str(k_quant_sized(tmp_path)), str(out), ftype],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    config, weights, _ = checkpoint.load(out)
    assert {w.dtype for w in weights.values() if w.dtype.block} == kinds
    want = Llama(config, {k: Tensor(w.numpy()) for k, w in weights.items()}).logits([t % config.vocab_size for t in PROMPT[:64]])
    got = Llama(config, weights).logits([t % config.vocab_size for t in PROMPT[:64]])
    # every product here reads its input in 8 bits per 256 values (all the weights are K-quants)
    assert nmse(got, want) <= quantised_products_on_path(config.n_layers) * q8_nmse_per_product(256)


@pytest.mark.parametrize("dtype", [dtypes.q4_k, dtypes.q5_k, dtypes.q6_k], ids=lambda d: d.name)
def test_llamacpp_reads_our_k_quants_as_we_do(llamacpp_bin, tmp_path, dtype):
    """Our K-quant files, dequantised by llama.cpp's own C code (llama-quantize to F32), hold
    exactly the values we compute from them; and llama.cpp generates from them."""
    config, weights, _ = checkpoint.load(k_quant_sized(tmp_path))
    ours = tmp_path / f"{dtype.name}.gguf"
    write_gguf(ours, config, {name: w.numpy() for name, w in weights.items()}, dtype=dtype)
    back = tmp_path / "back.gguf"
    done = subprocess.run([str(llamacpp_bin / "llama-quantize"), "--allow-requantize", str(ours), str(back), "F32"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (_, mine), (_, theirs) = gguf_file.read(ours), gguf_file.read(back)
    assert any(dt == dtype for _, dt in mine.values())
    for name, (raw, dt) in mine.items():
        assert np.array_equal(dtypes.widen(raw, dt).reshape(theirs[name][0].shape), theirs[name][0]), name
    done = subprocess.run([str(llamacpp_bin / "llama-simple"), "-m", str(ours), "-n", "4", "ab"], capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["llama-bpe", "gpt-2", "llama-spm"])
def test_a_vocabulary_written_by_us_reads_back_as_llamacpp_wrote_it(llamacpp_sources, tmp_path, name):
    """Each tokenizer kind survives our writer: the tokenizer keys of llama.cpp's vocab file come
    back unchanged, and the model file tokenizes as the vocab file does."""
    from models.llama3.config import LlamaConfig
    source = llamacpp_sources / "models" / f"ggml-vocab-{name}.gguf"
    tokenizer = checkpoint.load_tokenizer(source)
    config = LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tokenizer.vocab_size, ffn_dim=32)
    weights = {name: w.numpy() for name, w in checkpoint.random_weights(config).items()}
    write_gguf(tmp_path / "m.gguf", config, weights, tokenizer, dtypes.float16)
    theirs, mine = gguf_file.read_metadata(source), gguf_file.read_metadata(tmp_path / "m.gguf")
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]:
        assert mine.get(key) == theirs.get(key), key
    reread = checkpoint.load_tokenizer(tmp_path / "m.gguf")
    text = (source.parent / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    assert reread.encode(text) == tokenizer.encode(text)
