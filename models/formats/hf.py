"""Hugging Face folders: config.json + model.safetensors, or shards listed in
model.safetensors.index.json; the tokenizer as tokenizer.json (byte-level BPE) or Meta's
tokenizer.model under original/, with tokenizer_config.json and chat_template.jinja; sampling
defaults in generation_config.json. HF permutes q/k rows for its rotate-half RoPE; we undo it.
Every file is opened through tinytensor.state.files (inside the folder, regular, bounded)."""
import json
from pathlib import Path

import numpy as np

from models.formats import vision_checkpoint
from models.llama3 import config as configs, vision_config
from models.text.tokenizer import BPETokenizer, Llama3Tokenizer, TokenizerError
from tinytensor.state import CheckpointError, files, safetensors_file

NAMES = {  # Hugging Face name (after "model.layers.N.") -> Meta name (after "layers.N.")
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
       "lm_head.weight": "output.weight"}
MAX_TEMPLATE_BYTES = 1 << 20  # real chat templates are a few KB


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF stores each head's q/k rows as [first halves of pairs, second halves]; Meta (and our
    rotate-pairs RoPE) interleaves them. This is the inverse of HF's conversion permute."""
    rows, cols = w.shape
    if rows % (2 * n_heads):
        return w  # not this config's shape: _check_shapes says so
    return np.ascontiguousarray(w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3)
                                .reshape(rows, cols))


def read(folder: Path):
    settings = files.read_json(folder, "config.json")
    vision = isinstance(settings, dict) and settings.get("model_type") == "mllama"
    config = vision_config.from_hf(settings) if vision else configs.from_hf(settings)
    text = config.text if vision else config
    raw = {}
    for path in _safetensors_files(folder):
        raw.update(safetensors_file.read(path))
    arrays = {}
    names = {**NAMES, **vision_checkpoint.CROSS_NAMES} if vision else NAMES
    for name, (array, dt) in raw.items():
        if vision:
            name = vision_checkpoint.text_form(name)
            if name.startswith(("vision_model.", "multi_modal_projector.")):
                arrays[name] = (array, dt)
                continue
        if name in TOP:
            arrays[TOP[name]] = (array, dt)
            continue
        parts = name.split(".", 3)
        if parts[:2] != ["model", "layers"] or parts[3] not in names:
            continue  # e.g. rotary_emb.inv_freq: derived, not a weight
        meta = names[parts[3]]
        if meta == "attention.wq.weight":  # (cross-attention has no RoPE: its q/k are as trained)
            array = unpermute(array, text.n_heads)
        elif meta == "attention.wk.weight":
            array = unpermute(array, text.n_kv_heads)
        arrays[f"layers.{parts[2]}.{meta}"] = (array, dt)
    return config, arrays, read_tokenizer(folder, config.image_token_id if vision else None)


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files: those model.safetensors.index.json lists, else every *.safetensors; each
    inside the folder."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = files.read_json(folder, index.name)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map is not an object of tensor name -> file name")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (folder / name).exists():
                raise CheckpointError(f"{folder / name}: missing (listed in model.safetensors.index.json)")
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names:
        raise CheckpointError(f"{folder}: config.json but no *.safetensors weights")
    return [files.inside(folder, name) for name in names]


def read_tokenizer(folder: Path, image_token_id: int | None = None):
    for candidate in (folder / "original" / "tokenizer.model", folder / "tokenizer.model"):
        if candidate.exists():
            tokenizer = Llama3Tokenizer(files.inside(folder, candidate.relative_to(folder)), image_token_id)
            tokenizer.chat_template = chat_template(folder, tokenizer_settings(folder))
            return tokenizer
    if (folder / "tokenizer.json").exists():
        return tokenizer_json(folder)
    return None


def tokenizer_json(folder: Path) -> BPETokenizer:
    path = folder / "tokenizer.json"
    spec = files.read_json(folder, path.name)
    settings = tokenizer_settings(folder)
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise TokenizerError(f"{path}: model type {kind!r} is not supported (BPE only)")
    vocab, added_tokens, merges = model.get("vocab"), spec.get("added_tokens") or [], model.get("merges") or []
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and i >= 0 for i in vocab.values()) or not vocab:
        raise TokenizerError(f"{path}: model.vocab is not an object of token -> id")
    if not isinstance(added_tokens, list) or not all(
            isinstance(a, dict) and isinstance(a.get("content"), str) and type(a.get("id")) is int and a["id"] >= 0
            for a in added_tokens):
        raise TokenizerError(f"{path}: added_tokens is not a list of {{content, id}}")
    if not isinstance(merges, list) or not all(isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and
                                                                      all(isinstance(s, str) for s in m))
                                               for m in merges):
        raise TokenizerError(f"{path}: model.merges is not a list of pairs")
    vocab = {**vocab, **{a["content"]: a["id"] for a in added_tokens}}
    if max(vocab.values()) >= 2 * len(vocab):  # ids are dense in every real vocabulary
        raise TokenizerError(f"{path}: token id {max(vocab.values())} is far beyond the {len(vocab)} tokens")
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    types = [BPETokenizer.NORMAL] * len(tokens)
    for added in added_tokens:  # as llama.cpp's converter types them
        types[added["id"]] = BPETokenizer.CONTROL if added.get("special") else BPETokenizer.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    ignore_merges = bool(model.get("ignore_merges"))
    pre = json.dumps(spec.get("pre_tokenizer"))
    if "\\\\p{N}{1,3}" in pre:  # Llama 3's split; llama.cpp names it by whether merges are skipped
        pre_name = "llama-bpe" if ignore_merges else "smaug-bpe"
    else:
        pre_name = "smollm" if "individual_digits\": true" in pre else "gpt2"
    ids = {t: i for i, t in enumerate(tokens)}
    bos_id = ids.get(_token_text(settings.get("bos_token")))
    add_bos = settings.get("add_bos_token")
    if add_bos is None:  # not stated: whether the post-processor puts the BOS first, as Llama 3's does
        processor = spec.get("post_processor")
        single = processor.get("single") if isinstance(processor, dict) else None
        first = single[0] if isinstance(single, list) and single and isinstance(single[0], dict) else {}
        special = first.get("SpecialToken")
        add_bos = bos_id is not None and isinstance(special, dict) and special.get("id") == tokens[bos_id]
    return BPETokenizer(tokens, merges, types, pre_name, bos_id, ids.get(_token_text(settings.get("eos_token"))),
                        bool(add_bos), chat_template(folder, settings), ignore_merges=ignore_merges)


def tokenizer_settings(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    settings = files.read_json(folder, path.name) if path.exists() else {}
    if not isinstance(settings, dict):
        raise TokenizerError(f"{path}: not a JSON object of settings")
    return settings


def chat_template(folder: Path, settings: dict) -> str | None:
    """transformers >= 4.43 saves the template as chat_template.jinja; older folders keep it in
    tokenizer_config.json."""
    path = folder / "chat_template.jinja"
    if path.exists():
        return files.read_text(files.inside(folder, path.name), MAX_TEMPLATE_BYTES)
    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _token_text(token) -> str | None:
    text = token.get("content") if isinstance(token, dict) else token
    return text if isinstance(text, str) else None


def generation_settings(path) -> dict:
    """A Hugging Face folder's generation_config.json, as sampling settings the CLI understands
    (temperature, top_k, top_p, min_p, repetition_penalty; greedy where do_sample is false) and
    its extra stop ids. Empty for other layouts or when the file is absent."""
    path = Path(path)
    file = path / "generation_config.json"
    if not path.is_dir() or not file.exists():
        return {}
    d = files.read_json(path, file.name)
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: not a JSON object of settings")
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    settings = {k: d[k] for k in names if isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)}
    if d.get("do_sample") is False:
        settings["temperature"] = 0.0
    stops = d.get("eos_token_id")
    stops = stops if isinstance(stops, list) else [stops]
    settings["stop_ids"] = {s for s in stops if type(s) is int}
    return settings
