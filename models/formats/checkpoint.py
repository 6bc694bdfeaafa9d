"""Finding and reading Llama checkpoints in the layouts users have on disk, into one form:
(config, {Meta weight name: Tensor}, tokenizer).

- Hugging Face folder: config.json + model.safetensors or model-0000x-of-0000y.safetensors with
  model.safetensors.index.json. HF permutes q/k rows for its rotate-half RoPE; we undo it.
- Meta folder: params.json + consolidated.00.pth (.01... for 70B/405B, merged) + tokenizer.model.
- GGUF file: metadata gives the config, the tokenizer and the chat template.
"""
import json
import zlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.formats import tensor_parallel, vision_checkpoint
from models.formats.quant_mix import fallback
from models.llama3 import config as configs, vision_config
from models.text.spm_tokenizer import SentencePieceTokenizer
from models.text.tokenizer import PRE_TOKENIZERS, BPETokenizer, Llama3Tokenizer, TokenizerError
from ops import dtypes
from tinytensor import Tensor
from tinytensor.state import CheckpointError, files, gguf_file, progress, pth_file, safetensors_file

HF_NAMES = {  # Hugging Face name (after "model.layers.N.") -> Meta name (after "layers.N.")
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
          "lm_head.weight": "output.weight"}
GGUF_NAMES = {
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight", "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
GGUF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
            "output.weight": "output.weight"}
MAX_TEMPLATE_BYTES = 1 << 20  # real chat templates are a few KB
# Meta's model-parallel shards split these along the given axis; norms are replicated.
META_SHARD_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
                   "wo": 1, "w2": 1, "tok_embeddings": 1}


def detect(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise CheckpointError(f"{path}: not a checkpoint: give a .gguf file or a checkpoint folder")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    raise CheckpointError(f"{path}: no checkpoint here: expected config.json + *.safetensors (Hugging Face), "
                          f"params.json + consolidated.*.pth (Meta), or a .gguf file")


def load(path: Path, dtype=None, part=(0, 1)):
    """(config, weights, tokenizer) from a checkpoint on disk. dtype: cast weights to it, or
    quantise them to it when it is a block type ('q8_0', 'q4_0', ...: see `quantised`); None
    keeps what the file holds (float types and the block types of ops/blocks.py as stored, other
    quantised GGUF tensors as bfloat16). part: (rank, size), the weights of process `rank` of
    `size` under tensor parallelism (models/formats/tensor_parallel.py), split before any cast."""
    path = Path(path)
    config, arrays, tokenizer = read(path, part)
    if part[1] > 1:
        arrays = tensor_parallel.Shards(config, arrays, *part)
    dtype = None if dtype is None else dtypes.to_dtype(dtype)
    weights = {}
    for name, (array, dt) in progress(arrays.items(), f"loading {path.name}", len(arrays)):
        if dtype is not None and dtype.block and not vision_checkpoint.stays_float(name):
            weights[name] = quantised(array, dt, dtype)
            continue
        t = Tensor.from_numpy(array, dt)
        weights[name] = t if dtype is None or dtype.block else t.cast(dtype).realize()
    return config, weights, tokenizer


def read(path: Path, part=(0, 1)):
    """(config, {Meta name: (array, dtype)}, tokenizer) as the checkpoint stores them: the arrays
    memory-mapped where the format allows, every shape checked against the config. part (rank,
    size): a Meta folder's model-parallel shards are merged only where process `rank` of `size`
    will take its share (tensor_parallel.Shards): the rest of such a tensor is zeros."""
    path = Path(path)
    kind = detect(path)
    load_meta = lambda folder: _load_meta(folder, part)  # noqa: E731
    try:
        config, arrays, tokenizer = {"hf": _load_hf, "meta": load_meta, "gguf": _load_gguf}[kind](path)
    except configs.ConfigError as e:  # every config is checked once, when it is read
        config_file = {"hf": path / "config.json", "meta": path / "params.json", "gguf": path}[kind]
        raise CheckpointError(f"{config_file}: {e}") from None
    _check_shapes(path, config, arrays)
    return config, arrays, tokenizer


def quantised(array: np.ndarray, dt, dtype) -> Tensor:
    """A weight in the block type `dtype`, quantised in memory as llama-quantize would write it
    (ops.blocks.quantize), a few thousand rows at a time. Vectors (the norms) stay as they are;
    matrices whose rows are not whole blocks take llama.cpp's fallback type, as our GGUF writer
    gives them (quant_mix.fallback), or stay as they are where that is a float type."""
    target = fallback(dtype, dt.logical_shape(array.shape)[-1]) if array.ndim == 2 else dt
    if target == dt or not target.block:
        return Tensor.from_numpy(array, dt)
    return Tensor.from_numpy(dtypes.convert(array, dt, target), target)


# ---- Hugging Face ---------------------------------------------------------------------------

def _read_json(folder: Path, name: str):
    """A JSON file of the checkpoint folder, opened as tinytensor.state.files opens them."""
    path = files.inside(folder, name)
    try:
        return json.loads(files.read_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / name}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{folder / name}: not valid JSON (nested too deeply)") from None


def _unpermute_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF stores each head's q/k rows as [first halves of pairs, second halves]; Meta (and our
    rotate-pairs RoPE) interleaves them. This is the inverse of HF's conversion permute."""
    rows, cols = w.shape
    if rows % (2 * n_heads):
        return w  # not this config's shape: _check_shapes says so
    return np.ascontiguousarray(w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3)
                                .reshape(rows, cols))


def _load_hf(folder: Path):
    settings = _read_json(folder, "config.json")
    vision = isinstance(settings, dict) and settings.get("model_type") == "mllama"
    config = vision_config.from_hf(settings) if vision else configs.from_hf(settings)
    text = config.text if vision else config
    raw = {}
    for path in _safetensors_files(folder):
        raw.update(safetensors_file.read(path))
    arrays = {}
    names = {**HF_NAMES, **vision_checkpoint.CROSS_NAMES} if vision else HF_NAMES
    for name, (array, dt) in raw.items():
        if vision:
            name = vision_checkpoint.text_form(name)
            if name.startswith(("vision_model.", "multi_modal_projector.")):
                arrays[name] = (array, dt)
                continue
        if name in HF_TOP:
            arrays[HF_TOP[name]] = (array, dt)
            continue
        parts = name.split(".", 3)
        if parts[:2] != ["model", "layers"] or parts[3] not in names:
            continue  # e.g. rotary_emb.inv_freq: derived, not a weight
        meta = names[parts[3]]
        if meta == "attention.wq.weight":  # (cross-attention has no RoPE: its q/k are as trained)
            array = _unpermute_hf(array, text.n_heads)
        elif meta == "attention.wk.weight":
            array = _unpermute_hf(array, text.n_kv_heads)
        arrays[f"layers.{parts[2]}.{meta}"] = (array, dt)
    return config, arrays, hf_tokenizer(folder, config.image_token_id if vision else None)


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files: those model.safetensors.index.json lists, else every *.safetensors; each
    inside the folder."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(folder, index.name)
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


def hf_tokenizer(folder: Path, image_token_id: int | None = None):
    for candidate in (folder / "original" / "tokenizer.model", folder / "tokenizer.model"):
        if candidate.exists():
            tokenizer = Llama3Tokenizer(files.inside(folder, candidate.relative_to(folder)), image_token_id)
            tokenizer.chat_template = _chat_template(folder, _tokenizer_settings(folder))
            return tokenizer
    if (folder / "tokenizer.json").exists():
        return tokenizer_json(folder)
    return None


def tokenizer_json(folder: Path) -> BPETokenizer:
    path = folder / "tokenizer.json"
    spec = _read_json(folder, path.name)
    settings = _tokenizer_settings(folder)
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
                        bool(add_bos), _chat_template(folder, settings), ignore_merges=ignore_merges)


def _tokenizer_settings(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    settings = _read_json(folder, path.name) if path.exists() else {}
    if not isinstance(settings, dict):
        raise TokenizerError(f"{path}: not a JSON object of settings")
    return settings


def _chat_template(folder: Path, settings: dict) -> str | None:
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


# ---- Meta -----------------------------------------------------------------------------------

def _load_meta(folder: Path, part=(0, 1)):
    params = _read_json(folder, "params.json")
    shards = [files.inside(folder, p.name) for p in sorted(folder.glob("consolidated.*.pth"))]
    if not shards:
        raise CheckpointError(f"{folder}: params.json but no consolidated.*.pth weights")
    tokenizer = meta_tokenizer(folder)
    states = [pth_file.read(p) for p in shards]
    embedding = states[0].get("tok_embeddings.weight")  # params.json may say vocab_size -1
    vocab = embedding[0].shape[0] if embedding is not None and embedding[0].ndim == 2 else None
    config = configs.from_meta(params, vocab_size=vocab)
    arrays = {}
    for name in states[0]:
        if name.endswith("rope.freqs"):
            continue
        axis = META_SHARD_AXIS.get(name.split(".")[-2] if "." in name else name)
        parts = [s.get(name) for s in states]
        if len(parts) == 1 or axis is None:
            arrays[name] = parts[0]
            continue
        if any(p is None or p[0].ndim != parts[0][0].ndim or p[1] != parts[0][1] for p in parts) \
                or parts[0][0].ndim <= axis:
            raise CheckpointError(f"{folder}: the shards' {name} do not fit together: a shard is damaged or "
                                  f"from another model")
        try:
            if part[1] > 1 and tensor_parallel.split_axis(name) == axis:
                arrays[name] = (_merged_share([a for a, _ in parts], axis, *part), parts[0][1])
                continue
            arrays[name] = (np.concatenate([a for a, _ in parts], axis=axis), parts[0][1])
        except ValueError:
            raise CheckpointError(f"{folder}: the shards' {name} have shapes that do not fit together") from None
    if "output.weight" not in arrays:
        config = replace(config, tied_embeddings=True)
    elif config.tied_embeddings:  # a published tied size saved with an explicit head
        config = replace(config, tied_embeddings=False)
    return config, arrays, tokenizer


def _merged_share(parts: list, axis: int, rank: int, size: int) -> np.ndarray:
    """The shards concatenated along `axis`, with only process rank's 1/size of that axis filled
    in, from the files that hold it; the rest is zeros never written (no memory), so that rank r
    of N reads only its part of Meta's model-parallel files (Meta splits the matrices along the
    axes tensor parallelism does)."""
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    out = np.zeros(shape, parts[0].dtype)
    lo, hi, offset = rank * (shape[axis] // size), (rank + 1) * (shape[axis] // size), 0
    for p in parts:
        a, b = max(lo, offset), min(hi, offset + p.shape[axis])
        if a < b:
            dst, src = [slice(None)] * len(shape), [slice(None)] * len(shape)
            dst[axis], src[axis] = slice(a, b), slice(a - offset, b - offset)
            out[tuple(dst)] = p[tuple(src)]
        offset += p.shape[axis]
    return out


def meta_tokenizer(folder: Path):
    path = folder / "tokenizer.model"
    if not path.exists():
        return None
    tokenizer = Llama3Tokenizer(files.inside(folder, path.name))
    tokenizer.instruct = "instruct" in folder.resolve().name.lower()  # params.json does not say
    return tokenizer


# ---- GGUF -----------------------------------------------------------------------------------

def _load_gguf(path: Path):
    metadata, raw = gguf_file.read(path)
    rope_freqs = raw.get("rope_freqs.weight")
    config = configs.from_gguf(metadata, None if rope_freqs is None else rope_freqs[0])
    arrays = {}
    for name, value in raw.items():
        if name in GGUF_TOP:
            arrays[GGUF_TOP[name]] = value
        elif name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest in GGUF_NAMES:
                arrays[f"layers.{layer}.{GGUF_NAMES[rest]}"] = value
    if "output.weight" not in arrays:
        config = replace(config, tied_embeddings=True)
    return config, arrays, gguf_tokenizer(path, metadata)


def gguf_tokenizer(path: Path, m: dict):
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


def load_tokenizer(path: Path):
    """Just the tokenizer of a checkpoint folder, a .gguf file, or a Llama 3 tokenizer.model."""
    path = Path(path)
    if path.is_file() and path.suffix != ".gguf":
        return Llama3Tokenizer(path)
    kind = detect(path)
    if kind == "gguf":
        return gguf_tokenizer(path, gguf_file.read_metadata(path))
    tokenizer = hf_tokenizer(path) if kind == "hf" else meta_tokenizer(path)
    if tokenizer is None:
        raise CheckpointError(f"{path}: has no tokenizer (tokenizer.model or tokenizer.json)")
    return tokenizer


def generation_settings(path) -> dict:
    """A Hugging Face folder's generation_config.json, as sampling settings the CLI understands
    (temperature, top_k, top_p, min_p, repetition_penalty; greedy where do_sample is false) and
    its extra stop ids. Empty for other layouts or when the file is absent."""
    path = Path(path)
    file = path / "generation_config.json"
    if not path.is_dir() or not file.exists():
        return {}
    d = _read_json(path, file.name)
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


# ---- checks ---------------------------------------------------------------------------------

def expected_shapes(c) -> dict[str, tuple[int, ...]]:
    if isinstance(c, vision_config.MllamaConfig):
        return vision_checkpoint.expected_shapes(c, expected_shapes)
    shapes = {"tok_embeddings.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (c.n_heads * c.head_dim, c.dim),
            p + "attention.wk.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wv.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wo.weight": (c.dim, c.n_heads * c.head_dim),
            p + "feed_forward.w1.weight": (c.ffn_dim, c.dim),
            p + "feed_forward.w3.weight": (c.ffn_dim, c.dim),
            p + "feed_forward.w2.weight": (c.dim, c.ffn_dim),
            p + "attention_norm.weight": (c.dim,), p + "ffn_norm.weight": (c.dim,)})
    return shapes


def _check_shapes(path: Path, config, arrays):
    for name, shape in expected_shapes(config).items():
        if name not in arrays:
            raise CheckpointError(f"{path}: weight {name} is missing")
        array, dtype = arrays[name]
        if dtype.logical_shape(array.shape) != shape:
            raise CheckpointError(f"{path}: weight {name} has shape {dtype.logical_shape(array.shape)}, "
                                  f"expected {shape} for this model's config")


def random_array(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """One weight of a random model: normal with a 1/sqrt(fan_in) scale so activations stay
    O(1); norms are ones. Each tensor has its own stream (from the seed and its name), so a
    writer can make one at a time."""
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(int(np.prod(shape[1:])) ** -0.5)


class RandomArrays(Mapping):
    """The exact architecture's weights as float32 arrays, each made when it is read, so that
    writing a random 8B checkpoint never holds more than one float32 tensor."""

    def __init__(self, c, seed: int = 0):
        self.shapes, self.seed = expected_shapes(c), seed

    def __getitem__(self, name: str) -> np.ndarray:
        return random_array(name, self.shapes[name], self.seed)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def random_weights(c, seed: int = 0, dtype=dtypes.float32, only=None, part=(0, 1)) -> dict[str, Tensor]:
    """The exact architecture (a LlamaConfig or a vision MllamaConfig) with random weights (for
    benchmarks and tests), as Tensors of dtype; only: a name test, to make just those weights;
    part: (rank, size), as for `load`."""
    arrays = RandomArrays(c, seed)
    if part[1] > 1:
        arrays = tensor_parallel.Shards(c, arrays, *part)
    names = [name for name in arrays if only is None or only(name)]
    if dtype.block:
        return {name: Tensor.from_numpy(arrays[name]) if vision_checkpoint.stays_float(name)
                else quantised(arrays[name], dtypes.float32, dtype)
                for name in progress(names, "random weights", len(names))}
    return {name: Tensor.from_numpy(dtypes.narrow(arrays[name], dtype), dtype)
            for name in progress(names, "random weights", len(names))}
