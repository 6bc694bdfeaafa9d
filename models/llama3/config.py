"""Llama model shapes: one table for the published Llama 3.1 / 3.2 text sizes, and readers that
describe any other Llama-architecture checkpoint from its own files (HF config.json, Meta
params.json, GGUF metadata)."""
import math
from dataclasses import dataclass, field, replace

from tinytensor.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot describe a model; the message names the field and the rule."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency scaling (`rope_type: llama3`)."""
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"rope scaling {name} is {value!r}: it must be a positive number")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope scaling high_freq_factor ({self.high_freq_factor}) must exceed "
                              f"low_freq_factor ({self.low_freq_factor})")


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tied_embeddings: bool = False
    max_context: int = 131072
    head_dim: int = 0  # 0: dim // n_heads
    name: str = "llama"
    # Per-frequency divisors as a GGUF's `rope_freqs` tensor stores them (llama.cpp's converter
    # writes Llama 3.1's scaling this way); when set they replace rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_context"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} is {value!r}: it must be a whole number >= 1")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} is {value!r}: it must be a positive number")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}): "
                              f"each key/value head serves a whole group of query heads")
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim ({self.dim}) is not a multiple of n_heads ({self.n_heads}); "
                                  f"give head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if type(self.head_dim) is not int or self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"head_dim is {self.head_dim!r}: RoPE needs an even size >= 2")

    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        head = 0 if self.tied_embeddings else self.vocab_size * self.dim
        return self.n_layers * layer + self.vocab_size * self.dim + head + self.dim


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Meta's params.json describe FFN width by (multiple_of, ffn_dim_multiplier), per size
META_FFN = {"1b": (256, 1.5), "3b": (256, 1.0), "8b": (1024, 1.3), "70b": (4096, 1.3), "405b": (4096, 1.2)}

_LLAMA32 = RopeScaling(factor=32.0)  # Llama 3.2 1B/3B: factor 32 (Meta's reference code says 8)
_LLAMA31 = RopeScaling(factor=8.0)

SIZES = {
    "1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                      ffn_dim=meta_ffn_dim(2048, *META_FFN["1b"]), rope_scaling=_LLAMA32,
                      tied_embeddings=True, name="Llama-3.2-1B"),
    "3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                      ffn_dim=meta_ffn_dim(3072, *META_FFN["3b"]), rope_scaling=_LLAMA32,
                      tied_embeddings=True, name="Llama-3.2-3B"),
    "8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                      ffn_dim=meta_ffn_dim(4096, *META_FFN["8b"]), rope_scaling=_LLAMA31, name="Llama-3.1-8B"),
    "70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                       ffn_dim=meta_ffn_dim(8192, *META_FFN["70b"]), rope_scaling=_LLAMA31, name="Llama-3.1-70B"),
    "405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256,
                        ffn_dim=meta_ffn_dim(16384, *META_FFN["405b"]), rope_scaling=_LLAMA31,
                        name="Llama-3.1-405B"),
}


def size_of(config: LlamaConfig) -> str | None:
    """The published size whose shape this config has, if any."""
    for size, known in SIZES.items():
        if (known.dim, known.n_layers, known.n_heads, known.n_kv_heads) == \
                (config.dim, config.n_layers, config.n_heads, config.n_kv_heads):
            return size
    return None


def _rope_from_hf(d: dict) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or {}  # transformers >= 5 nests them here
    scaling = d.get("rope_scaling") or params
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling is {scaling!r}, not an object of settings")
    theta = d.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"rope scaling type {kind!r} is not supported (only 'llama3')")
    return theta, RopeScaling(_typed(scaling.get("factor"), "rope_scaling.factor", float),
                              scaling.get("low_freq_factor", 1.0),
                              scaling.get("high_freq_factor", 4.0),
                              scaling.get("original_max_position_embeddings", 8192))


def _fields(d, what: str) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"{what} holds a {type(d).__name__}, not a JSON object of settings")
    return d


REQUIRED = object()


def _typed(value, key: str, kind, default=REQUIRED):
    """value checked to be of kind (int: a whole number, float: any number); a missing (None)
    value is the default, or an error where the field is required."""
    if value is None:
        if default is REQUIRED:
            raise ConfigError(f"the field {key!r} is missing")
        return default
    ok = type(value) is int if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"the field {key!r} is {value!r}, not a {'whole number' if kind is int else 'number'}")
    return value


def from_hf(d: dict) -> LlamaConfig:
    """A Hugging Face config.json (LlamaForCausalLM)."""
    d = _fields(d, "config.json")
    if d.get("model_type", "llama") != "llama":
        raise ConfigError(f"model_type {d.get('model_type')!r} is not a Llama-architecture model")
    return hf_text_config(d, "", str(d.get("_name_or_path") or "llama"))


def hf_text_config(d: dict, where: str, name: str) -> LlamaConfig:
    """The Llama fields of a Hugging Face config (a whole config.json, or a Vision model's
    text_config; `where` prefixes the field names in errors)."""
    def field(key, kind, default=REQUIRED, value=None):
        return _typed(d.get(key) if value is None else value, where + key, kind, default)

    theta, scaling = _rope_from_hf(d)
    n_heads = field("num_attention_heads", int)
    return LlamaConfig(
        dim=field("hidden_size", int), n_layers=field("num_hidden_layers", int), n_heads=n_heads,
        n_kv_heads=field("num_key_value_heads", int, n_heads), vocab_size=field("vocab_size", int),
        ffn_dim=field("intermediate_size", int), norm_eps=field("rms_norm_eps", float, 1e-5),
        rope_theta=field("rope_theta", float, value=theta), rope_scaling=scaling,
        tied_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_context=field("max_position_embeddings", int, 131072), head_dim=field("head_dim", int, 0), name=name)


def from_meta(d: dict, vocab_size: int | None = None) -> LlamaConfig:
    """A Meta params.json. It does not say the rope factor or whether the head is tied, so those
    come from the published size with the same shape."""
    d = _fields(d, "params.json")
    dim = _typed(d.get("dim"), "dim", int)
    n_heads = _typed(d.get("n_heads"), "n_heads", int)
    multiple_of = _typed(d.get("multiple_of"), "multiple_of", int, 256)
    if multiple_of < 1:
        raise ConfigError(f"the field 'multiple_of' is {multiple_of}: it must be >= 1")
    multiplier = _typed(d.get("ffn_dim_multiplier"), "ffn_dim_multiplier", float, None)
    if multiplier is not None and not 0 < multiplier < math.inf:
        raise ConfigError(f"the field 'ffn_dim_multiplier' is {multiplier}: it must be a positive number")
    base = LlamaConfig(
        dim=dim, n_layers=_typed(d.get("n_layers"), "n_layers", int), n_heads=n_heads,
        n_kv_heads=_typed(d.get("n_kv_heads"), "n_kv_heads", int, n_heads),
        vocab_size=_typed(vocab_size if d.get("vocab_size") in (None, -1) else d["vocab_size"], "vocab_size", int),
        ffn_dim=meta_ffn_dim(dim, multiple_of, multiplier),
        norm_eps=_typed(d.get("norm_eps"), "norm_eps", float, 1e-5),
        rope_theta=_typed(d.get("rope_theta"), "rope_theta", float, 10000.0))
    known = SIZES.get(size_of(base))
    scaling = (known.rope_scaling if known else _LLAMA31) if d.get("use_scaled_rope") else None
    return replace(base, rope_scaling=scaling, tied_embeddings=known.tied_embeddings if known else False,
                   name=known.name if known else "llama")


def from_gguf(meta: dict, rope_freqs=None) -> LlamaConfig:
    """GGUF metadata (`llama.*` keys), with the file's `rope_freqs` tensor if it has one.

    llama.cpp's converter stores Llama 3.1's RoPE scaling only as that tensor of per-frequency
    factors. Files this project wrote before did it with `llama.rope.scaling.type = "llama3"`
    and its parameters, which llama.cpp refuses; we keep reading those. Linear scaling (older
    Llama 2 fine-tunes) divides every frequency by the factor."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    n_heads = _typed(meta.get("llama.attention.head_count"), "llama.attention.head_count", int)
    dim = _typed(meta.get("llama.embedding_length"), "llama.embedding_length", int)
    head_dim = meta.get("llama.rope.dimension_count", dim // n_heads if n_heads else 0)
    kind = meta.get("llama.rope.scaling.type", "linear" if "llama.rope.scale_linear" in meta else "none")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear", 1.0))
    scaling, factors = None, None
    if rope_freqs is not None:
        factors = tuple(float(f) for f in rope_freqs)
        if len(factors) != head_dim // 2:
            raise ConfigError(f"rope_freqs has {len(factors)} factors, expected {head_dim // 2} (half the head size)")
    elif kind == "llama3":
        scaling = RopeScaling(factor, meta.get("llama.rope.scaling.low_freq_factor", 1.0),
                              meta.get("llama.rope.scaling.high_freq_factor", 4.0),
                              meta.get("llama.rope.scaling.original_context_length", 8192))
    elif kind == "linear":
        factors = (float(factor),) * (head_dim // 2)
    elif kind != "none":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (llama3 factors, linear or none)")
    return LlamaConfig(
        dim=dim, n_layers=_typed(meta.get("llama.block_count"), "llama.block_count", int), n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
        vocab_size=meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []),
        ffn_dim=_typed(meta.get("llama.feed_forward_length"), "llama.feed_forward_length", int),
        norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0), rope_scaling=scaling, rope_freq_factors=factors,
        max_context=meta.get("llama.context_length", 8192), head_dim=head_dim,
        name=meta.get("general.name", "llama"))


def rope_freq_factors(config: LlamaConfig) -> list[float]:
    """How much each pair's rotation is slowed. Llama 3.1's scaling: long wavelengths by `factor`,
    short ones not at all, the band between interpolated (Meta's `apply_scaling`, in the form
    llama.cpp's converter stores it)."""
    if config.rope_freq_factors is not None:
        return list(config.rope_freq_factors)
    half, s = config.head_dim // 2, config.rope_scaling
    if s is None:
        return [1.0] * half
    low_wavelen = s.original_context / s.low_freq_factor
    high_wavelen = s.original_context / s.high_freq_factor
    factors = []
    for f in _base_frequencies(config):
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s.factor)
        else:
            smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return factors


def _base_frequencies(config: LlamaConfig) -> list[float]:
    return [config.rope_theta ** (-2 * i / config.head_dim) for i in range(config.head_dim // 2)]


def rope_frequencies(config: LlamaConfig) -> "list[float]":
    """The rotation frequency of each pair of a head, with the checkpoint's scaling applied."""
    return [f / r for f, r in zip(_base_frequencies(config), rope_freq_factors(config))]
