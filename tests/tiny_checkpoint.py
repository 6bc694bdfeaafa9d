"""A Hugging Face folder small enough to write in a second: random weights of a 1-layer model with
a 260-token byte-level BPE tokenizer (256 bytes, two merges, <s> and </s>) and, when given, a chat
template. For tests of what surrounds the model: loading, serving, hostile files."""
import json

from models.formats import checkpoint
from models.llama3.config import LlamaConfig
from models.text.tokenizer import byte_to_unicode
from tools import make_checkpoint

CONFIG = LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=260, ffn_dim=64, max_context=64)


def write_tokenizer(folder, template: str | None = None):
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) in folder."""
    symbols = list(byte_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({"ĠĠ": 256, "he": 257})
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ Ġ", ["h", "e"]], "ignore_merges": False},
            "added_tokens": [{"id": 258, "content": "<s>", "special": True},
                             {"id": 259, "content": "</s>", "special": True}],
            "pre_tokenizer": {"type": "ByteLevel"},
            "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}]}}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def write_tiny_hf(folder, template: str | None = None):
    make_checkpoint.write_hf(folder, CONFIG, checkpoint.RandomArrays(CONFIG))
    return write_tokenizer(folder, template)
