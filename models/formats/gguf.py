"""GGUF files as llama.cpp's converter and llama-quantize write them: the metadata gives the
config, the vocabulary (byte-level BPE or SentencePiece) and the chat template; the tensors stay
as stored, memory-mapped (tinytensor.state.gguf_file)."""
from dataclasses import replace
from pathlib import Path

from models.llama3 import config as configs
from models.text.spm_tokenizer import SentencePieceTokenizer
from models.text.tokenizer import PRE_TOKENIZERS, BPETokenizer, TokenizerError
from tinytensor.state import gguf_file

NAMES = {
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight", "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
       "output.weight": "output.weight"}


def read(path: Path):
    metadata, raw = gguf_file.read(path)
    rope_freqs = raw.get("rope_freqs.weight")
    config = configs.from_gguf(metadata, None if rope_freqs is None else rope_freqs[0])
    arrays = {}
    for name, value in raw.items():
        if name in TOP:
            arrays[TOP[name]] = value
        elif name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest in NAMES:
                arrays[f"layers.{layer}.{NAMES[rest]}"] = value
    if "output.weight" not in arrays:
        config = replace(config, tied_embeddings=True)
    return config, arrays, read_tokenizer(path, metadata)


def read_tokenizer(path: Path, m: dict):
    """The vocabulary in a GGUF's `tokenizer.ggml.*` keys: byte-level BPE (`gpt2`) or
    SentencePiece (`llama`), with the defaults llama.cpp takes where a key is absent."""
    kind = m.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise TokenizerError(f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' "
                             f"or SentencePiece 'llama')")
    key = lambda name: "tokenizer.ggml." + name  # noqa: E731
    tokens = _vocab_list(path, m, key("tokens"), str)
    types = _vocab_list(path, m, key("token_type"), int, len(tokens))
    ids = {}
    for name in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id"):
        value = m.get(key(name))
        if value is not None and (type(value) is not int or not 0 <= value < len(tokens)):
            raise TokenizerError(f"{path}: {key(name)} is {value!r}, not a token id below {len(tokens)}")
        ids[name] = value
    stops = [ids[k] for k in ("eot_token_id", "eom_token_id") if ids[k] is not None]
    add_bos, template = m.get(key("add_bos_token")), m.get("tokenizer.chat_template")
    if not isinstance(template, (str, type(None))):
        raise TokenizerError(f"{path}: tokenizer.chat_template is not a string")
    if kind == "gpt2":
        merges = _vocab_list(path, m, key("merges"), str, required=False)
        pre = m.get(key("pre"), "default")
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"{path}: {key('pre')} is {pre!r}, a pre-tokenizer not supported here; known: "
                                 f"{', '.join(PRE_TOKENIZERS)}")
        return BPETokenizer(tokens, merges, types, pre, ids["bos_token_id"],
                            ids["eos_token_id"], add_bos, template, stops)
    scores = _vocab_list(path, m, key("scores"), float, len(tokens))
    bos = 1 if ids["bos_token_id"] is None else ids["bos_token_id"]
    eos = 2 if ids["eos_token_id"] is None else ids["eos_token_id"]
    return SentencePieceTokenizer(tokens, scores, types, bos, eos, True if add_bos is None else add_bos,
                                  m.get(key("add_space_prefix"), True), template, stops)


def _vocab_list(path: Path, m: dict, key: str, kind, length: int | None = None, required: bool = True) -> list:
    """A GGUF tokenizer array, checked for its element type and length."""
    values = m.get(key)
    if values is None and not required:
        return []
    ok = isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values) \
        if kind is not float else isinstance(values, list) and all(isinstance(v, (int, float)) for v in values)
    if not ok:
        raise TokenizerError(f"{path}: {key} is {'missing' if values is None else 'not a list of ' + kind.__name__}: "
                             f"the file's vocabulary is damaged")
    if length is not None and len(values) != length:
        raise TokenizerError(f"{path}: {key} has {len(values)} entries for {length} tokens")
    return values
