"""Llama checkpoints written as GGUF in the layout llama.cpp's own converter (`convert_hf_to_gguf.py`)
writes, so that llama.cpp loads what we write and we read what it writes the same way:

- hyperparameters under `llama.*` (key/value lengths and the vocabulary size included);
- Llama 3.1's RoPE scaling as a `rope_freqs.weight` tensor of per-frequency factors, with no
  `rope.scaling.*` keys (llama.cpp refuses a scaling type it does not know);
- the tokenizer as `tokenizer.ggml.*` keys: byte-level BPE tokens, types and merges under
  llama.cpp's pre-tokenizer name, or SentencePiece tokens and scores; the chat template;
- weights in Meta's row layout under llama.cpp's names, 1-D norms in F32.
"""
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from models.formats import checkpoint, gguf, quant_mix
from models.formats.quant_mix import FileType
from models.llama3.config import LlamaConfig, rope_freq_factors
from models.text.spm_tokenizer import SentencePieceTokenizer
from models.text.tokenizer import BPETokenizer, Llama3Tokenizer, VocabTokenizer, byte_to_unicode
from ops import dtypes
from tinytensor.state import files, progress

GGUF_FROM_META = {meta: name for name, meta in gguf.NAMES.items()}
GGUF_TOP_FROM_META = {meta: name for name, meta in gguf.TOP.items()}


def write_gguf(path: Path, config: LlamaConfig, weights: Mapping, tokenizer=None,
               dtype: dtypes.DType | FileType = dtypes.float16, inputs=()) -> dict[str, dtypes.DType]:
    """Write the checkpoint at `path`, one tensor at a time (peak memory: about one tensor).

    weights: Meta names -> float arrays, or (array, dtype) pairs as checkpoint.read gives them
    (stored bits of any float or block type; a tensor already in its target type is copied as
    it is). dtype: one type for every matrix (norms stay float32; rows that are not whole
    blocks fall back as llama.cpp's do), or a models.formats.quant_mix.FileType such as Q4_K_M.
    tokenizer: a loaded tokenizer, or None for a stand-in byte-level vocabulary of
    config.vocab_size tokens (random test models). The file appears at `path` only once it is
    complete, and never over an existing file or one of `inputs` (the files read). Returns each
    GGUF tensor's type."""
    import gguf

    file_type = dtype if isinstance(dtype, FileType) else quant_mix.pure(dtype)
    shapes = checkpoint.expected_shapes(config)
    plan = {}  # GGUF name -> (Meta name, target dtype)
    for name in weights:
        if name not in shapes:
            raise ValueError(f"{name} is not a weight of this model's config")
        plan[gguf_name(name)] = (name, file_type.tensor_type(name, shapes[name], config))
    writer = gguf.GGUFWriter(None, "llama")
    _add_hyperparameters(writer, gguf, config, file_type.ftype)
    for key, value in vocabulary(tokenizer, config.vocab_size).items():
        writer.add_key_value(key, value, _value_type(gguf, value))

    factors = rope_freq_factors(config)
    extra = {"rope_freqs.weight": np.array(factors, np.float32)} if any(f != 1.0 for f in factors) else {}
    for name, array in extra.items():
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
    for name, (meta, target) in plan.items():
        storage = target.storage_shape(shapes[meta])
        writer.add_tensor_info(name, storage, target.storage, math.prod(storage) * target.itemsize,
                               raw_dtype=_ggml_type(gguf, target))
    with files.new_file(path, inputs) as partial:
        writer.open_output_file(partial)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for array in extra.values():
                writer.write_tensor_data(array)
            for name, (meta, target) in progress(plan.items(), f"writing {path.name}", len(plan)):
                value = weights[meta]
                array, source = value if isinstance(value, tuple) else (value, dtypes.from_numpy_dtype(value.dtype))
                writer.write_tensor_data(np.ascontiguousarray(dtypes.convert(array, source, target)))
        finally:
            writer.close()
    return {name: target for name, (_, target) in plan.items()}


def gguf_name(meta: str) -> str:
    if meta.startswith("layers."):
        _, i, rest = meta.split(".", 2)
        return f"blk.{i}.{GGUF_FROM_META[rest]}"
    return GGUF_TOP_FROM_META[meta]


def _ggml_type(gguf, dtype: dtypes.DType):
    if dtype.block:
        return gguf.GGMLQuantizationType(dtype.block.ggml_type)
    return {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
            "bfloat16": gguf.GGMLQuantizationType.BF16}[dtype.name]


def _add_hyperparameters(writer, gguf, config: LlamaConfig, file_type: int):
    """The `general.*` and `llama.*` keys, as llama.cpp's converter writes them."""
    writer.add_type("model")
    writer.add_name(config.name)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_context)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _value_type(gguf, value):
    """As the converter writes them: ids as u32; lists typed by their elements (token types i32,
    scores f32)."""
    T = gguf.GGUFValueType
    return {bool: T.BOOL, int: T.UINT32, str: T.STRING, list: T.ARRAY}[type(value)]


def vocabulary(tokenizer, vocab_size: int) -> dict:
    """The `tokenizer.*` keys llama.cpp's converter writes for this tokenizer."""
    if tokenizer is None:
        return _byte_vocabulary(vocab_size)
    if isinstance(tokenizer, Llama3Tokenizer):
        keys = _llama3_vocabulary(tokenizer)
    elif isinstance(tokenizer, BPETokenizer):
        keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": tokenizer.pre_name,
                "tokenizer.ggml.tokens": tokenizer.tokens, "tokenizer.ggml.token_type": tokenizer.types,
                "tokenizer.ggml.merges": tokenizer.merges}
    elif isinstance(tokenizer, SentencePieceTokenizer):
        keys = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.tokens": tokenizer.tokens, "tokenizer.ggml.scores": tokenizer.scores,
                "tokenizer.ggml.token_type": tokenizer.types,
                "tokenizer.ggml.add_space_prefix": tokenizer.add_space_prefix}
    else:
        raise TypeError(f"cannot write a {type(tokenizer).__name__} into a GGUF file")
    if len(keys["tokenizer.ggml.tokens"]) != vocab_size:
        raise ValueError(f"the tokenizer has {len(keys['tokenizer.ggml.tokens'])} tokens but the model's "
                         f"vocabulary is {vocab_size}")
    keys.update(_special_ids(tokenizer))
    if tokenizer.chat_template:
        keys["tokenizer.chat_template"] = tokenizer.chat_template
    return keys


def _special_ids(tokenizer) -> dict:
    keys = {}
    if tokenizer.bos_id is not None:
        keys["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    if tokenizer.eos_id is not None:
        keys["tokenizer.ggml.eos_token_id"] = tokenizer.eos_id
    add_bos = tokenizer.add_bos if isinstance(tokenizer, VocabTokenizer) else True  # Meta's encode adds one
    keys.update({"tokenizer.ggml.add_bos_token": bool(add_bos), "tokenizer.ggml.add_eos_token": False})
    return keys


def _llama3_vocabulary(tokenizer: Llama3Tokenizer) -> dict:
    """Meta's tiktoken ranks as byte-level BPE: each token's bytes as GPT-2's printable
    characters, and a merge (a, b) for every split of a token into two tokens, ordered by the
    rank of the token they make (tiktoken merges the pair whose result ranks lowest)."""
    to_unicode = byte_to_unicode()
    text = lambda b: "".join(to_unicode[c] for c in b)  # noqa: E731
    ranks = tokenizer.ranks
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(ranks[token[:k]], ranks[token[k:]], k) for k in range(1, len(token))
                  if token[:k] in ranks and token[k:] in ranks]
        merges += [f"{text(token[:k])} {text(token[k:])}" for _, _, k in sorted(splits)]
    by_rank = sorted(ranks, key=ranks.get)
    special = sorted(tokenizer.special, key=tokenizer.special.get)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": [text(t) for t in by_rank] + special,
            "tokenizer.ggml.token_type": [VocabTokenizer.NORMAL] * len(by_rank) + [VocabTokenizer.CONTROL] * len(special),
            "tokenizer.ggml.merges": merges}


def _byte_vocabulary(vocab_size: int) -> dict:
    """A stand-in for random models with no tokenizer: byte symbols, tokens merged from pairs of
    them (llama.cpp needs merges), control tokens for any rest, and BOS and EOS last."""
    if vocab_size < 4:
        raise ValueError(f"a vocabulary of {vocab_size} tokens is too small to write (at least 4)")
    plain = vocab_size - 2
    symbols = list(byte_to_unicode().values())[:min(256, plain - 1)]
    pairs = [(symbols[k % len(symbols)], symbols[k // len(symbols)])
             for k in range(min(plain - len(symbols), len(symbols) ** 2))]
    extra = [f"<|extra_{i}|>" for i in range(plain - len(symbols) - len(pairs))]
    tokens = [*symbols, *(a + b for a, b in pairs), *extra, "<|begin_of_text|>", "<|end_of_text|>"]
    types = [VocabTokenizer.NORMAL] * (len(symbols) + len(pairs)) + [VocabTokenizer.CONTROL] * (len(extra) + 2)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": [f"{a} {b}" for a, b in pairs],
            "tokenizer.ggml.bos_token_id": vocab_size - 2, "tokenizer.ggml.eos_token_id": vocab_size - 1,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False}
