"""Llama 3.2 Vision shapes (Hugging Face `MllamaForConditionalGeneration`, model_type "mllama"):
a Llama 3.1 text model with cross-attention layers inserted among its self-attention layers,
and a two-stage ViT image encoder whose features those layers attend to."""
from dataclasses import dataclass

from models.llama3.config import ConfigError, LlamaConfig, _fields, _typed, _LLAMA31, hf_text_config


MAX_TILES = 64  # tiles an image may be cut into: the arrangements to number grow as its square


@dataclass(frozen=True)
class VisionConfig:
    dim: int = 1280
    n_layers: int = 32              # the local transformer (one per tile's patches, all tiles at once)
    n_global_layers: int = 8        # the global transformer, tanh-gated
    n_heads: int = 16
    ffn_dim: int = 5120
    image_size: int = 560           # a tile's side in pixels
    patch_size: int = 14
    max_tiles: int = 4
    channels: int = 3
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)  # whose inputs are kept as features
    output_dim: int = 7680          # dim * (1 + len(intermediate_layers))
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_global_layers", "n_heads", "ffn_dim", "image_size", "patch_size",
                     "max_tiles", "channels", "output_dim"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"vision_config {name} is {value!r}: it must be a whole number >= 1")
        if self.max_tiles > MAX_TILES:
            raise ConfigError(f"vision_config max_num_tiles is {self.max_tiles}: at most {MAX_TILES} are supported "
                              f"(the published models take 4)")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config image_size ({self.image_size}) is not a multiple of patch_size "
                              f"({self.patch_size})")
        if self.dim % self.n_heads:
            raise ConfigError(f"vision_config hidden_size ({self.dim}) is not a multiple of attention_heads "
                              f"({self.n_heads})")
        bad = [i for i in self.intermediate_layers if type(i) is not int or not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(f"vision_config intermediate_layers_indices {bad} are not layers of 0..{self.n_layers - 1}")
        if self.output_dim != self.dim * (1 + len(self.intermediate_layers)):
            raise ConfigError(f"vision_config vision_output_dim is {self.output_dim}, but the final state and "
                              f"{len(self.intermediate_layers)} intermediate ones of {self.dim} make "
                              f"{self.dim * (1 + len(self.intermediate_layers))}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patches(self) -> int:
        """Tokens per tile: the patch grid plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def aspect_ratios(self) -> list[tuple[int, int]]:
        """(tiles high, tiles wide) arrangements, in the order their ids (1, 2, ...) number them."""
        n = self.max_tiles
        return [(h, w) for h in range(1, n + 1) for w in range(1, n + 1) if h * w <= n]

    def n_params(self) -> int:
        d, p = self.dim, self.patches
        layer = 4 * d * d + 2 * d * self.ffn_dim + self.ffn_dim + d + 4 * d
        ids = len(self.aspect_ratios) + 1
        return (self.channels * self.patch_size ** 2 * d + d + p * d + 1 + ids * self.max_tiles * p * d
                + 2 * (ids * self.max_tiles * d + 1) + 4 * d
                + self.n_layers * layer + self.n_global_layers * (layer + 2))


@dataclass(frozen=True)
class MllamaConfig:
    text: LlamaConfig                     # n_layers counts the cross-attention layers too
    cross_attention_layers: tuple[int, ...]
    vision: VisionConfig
    image_token_id: int = 128256
    extra_tokens: int = 8                 # embedding rows past the vocabulary (the image token's)

    def __post_init__(self):
        bad = [i for i in self.cross_attention_layers if type(i) is not int or not 0 <= i < self.text.n_layers]
        if bad or len(set(self.cross_attention_layers)) != len(self.cross_attention_layers):
            raise ConfigError(f"cross_attention_layers {list(self.cross_attention_layers)}: each must be a "
                              f"distinct layer of 0..{self.text.n_layers - 1}")
        if not 0 <= self.image_token_id < self.text.vocab_size + self.extra_tokens:
            raise ConfigError(f"image_token_index {self.image_token_id} is not a row of the embedding "
                              f"({self.text.vocab_size} + {self.extra_tokens})")

    def n_params(self) -> int:
        t, cross = self.text, len(self.cross_attention_layers)
        norms = 2 * t.head_dim * cross + 2 * cross
        return (t.n_params() + self.extra_tokens * t.dim + norms + self.vision.n_params()
                + self.vision.output_dim * t.dim + t.dim)


def _text(dim, layers, heads, ffn_dim, name) -> LlamaConfig:
    return LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=8, vocab_size=128256, ffn_dim=ffn_dim,
                       rope_scaling=_LLAMA31, name=name)


VISION_SIZES = {
    "11b": MllamaConfig(_text(4096, 40, 32, 14336, "Llama-3.2-11B-Vision"), tuple(range(3, 40, 5)), VisionConfig()),
    "90b": MllamaConfig(_text(8192, 100, 64, 28672, "Llama-3.2-90B-Vision"), tuple(range(3, 100, 5)), VisionConfig()),
}


def from_hf(d: dict) -> MllamaConfig:
    """A Hugging Face config.json of model_type "mllama" (text_config + vision_config)."""
    d = _fields(d, "config.json")
    t = _fields(d.get("text_config"), "text_config")
    v = _fields(d.get("vision_config"), "vision_config")
    text = hf_text_config(t, "text_config.", str(d.get("_name_or_path") or "mllama"))
    cross = t.get("cross_attention_layers")
    if not isinstance(cross, list):
        raise ConfigError(f"text_config.cross_attention_layers is {cross!r}, not a list of layer numbers")
    inter = v.get("intermediate_layers_indices", [3, 7, 15, 23, 30])
    if not isinstance(inter, list):
        raise ConfigError(f"vision_config.intermediate_layers_indices is {inter!r}, not a list of layer numbers")
    if v.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"vision_config.hidden_act {v.get('hidden_act')!r} is not supported (only 'gelu')")
    vision = VisionConfig(
        dim=_typed(v.get("hidden_size"), "vision_config.hidden_size", int, 1280),
        n_layers=_typed(v.get("num_hidden_layers"), "vision_config.num_hidden_layers", int, 32),
        n_global_layers=_typed(v.get("num_global_layers"), "vision_config.num_global_layers", int, 8),
        n_heads=_typed(v.get("attention_heads"), "vision_config.attention_heads", int, 16),
        ffn_dim=_typed(v.get("intermediate_size"), "vision_config.intermediate_size", int, 5120),
        image_size=_typed(v.get("image_size"), "vision_config.image_size", int, 560),
        patch_size=_typed(v.get("patch_size"), "vision_config.patch_size", int, 14),
        max_tiles=_typed(v.get("max_num_tiles"), "vision_config.max_num_tiles", int, 4),
        channels=_typed(v.get("num_channels"), "vision_config.num_channels", int, 3),
        intermediate_layers=tuple(inter),
        output_dim=_typed(v.get("vision_output_dim"), "vision_config.vision_output_dim", int, 7680),
        norm_eps=_typed(v.get("norm_eps"), "vision_config.norm_eps", float, 1e-5))
    ratios = v.get("supported_aspect_ratios")
    if ratios is not None and [tuple(r) for r in ratios] != vision.aspect_ratios:
        raise ConfigError(f"vision_config.supported_aspect_ratios {ratios} differ from every (h, w) with h * w <= "
                          f"{vision.max_tiles} in order, which the tile embeddings are numbered by")
    return MllamaConfig(text, tuple(cross), vision,
                        image_token_id=_typed(d.get("image_token_index"), "image_token_index", int, 128256))
