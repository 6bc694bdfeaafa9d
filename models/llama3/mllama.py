"""Llama 3.2 Vision (11B, 90B): the Llama text model with cross-attention layers that read the
image encoder's features, written against the Tensor API only.

    layer i in cross_attention_layers:
        x + tanh(g_attn) * seen * cross_attention(rms_norm(x), image features)
          + tanh(g_mlp) * seen * mlp(rms_norm(.))
    every other layer: the Llama block (models/llama3/model.py)

A text row attends to the images whose span holds its position (models/llama3/images.py); `seen` is 0
for rows that see no image, so those rows pass the layer unchanged, as Meta's reference does
(current transformers zeroes only the MLP part there). The image keys and values of every cross
layer are computed once per prompt and kept in the cache for the whole generation; a prompt
without images skips the cross layers.
"""
import time
from dataclasses import dataclass

import numpy as np

from models.llama3.images import ImageError, ImageSettings, Pixels, image_spans, open_image, preprocess
from models.llama3.model import KVCache, Llama
from models.llama3.vision import VisionEncoder, finish
from models.llama3.vision_config import MllamaConfig
from tinytensor import Tensor, nn

NEVER = np.iinfo(np.int64).max  # the end of a span that runs on through generation


@dataclass
class VisionKVCache(KVCache):
    """Self-attention layers: as KVCache. A cross layer's keys/values entries hold its image keys
    and values [kv_heads, vision tokens, head_dim] (None without images); first/end give each
    vision token the text positions [first, end) that see it."""
    first: Tensor | None = None
    end: Tensor | None = None
    cross: frozenset = frozenset()  # the cross layers

    @property
    def length(self) -> int:
        return next(k for i, k in enumerate(self.keys) if i not in self.cross).shape[1]


@dataclass
class EncodedImage:
    """One image as the cross layers read it: its keys and values [kv_heads, vision tokens,
    head_dim] for each cross layer. Made once per image: a server keeps them by the image's
    digest, so a conversation about a picture does not encode it every turn."""
    keys: dict[int, Tensor]
    values: dict[int, Tensor]
    tiles: int


class VisionLlama(Llama):
    def __init__(self, config: MllamaConfig, weights: dict[str, Tensor], tokenizer=None, context: int = 8192,
                 image_settings: ImageSettings | None = None):
        super().__init__(config.text, weights, tokenizer, context)
        self.mllama = config
        self.image_token_id = config.image_token_id
        self.cross_layers = frozenset(config.cross_attention_layers)
        self.n_token_ids = config.text.vocab_size + config.extra_tokens  # the image token's row too
        self.encoder = VisionEncoder(config.vision, weights)
        v = config.vision
        self.image_settings = image_settings or ImageSettings(v.image_size, v.max_tiles)
        self.vision_seconds = 0.0  # the last prompt's image encoding time

    # ---- images -----------------------------------------------------------------------------
    def pixels(self, image) -> Pixels:
        """A path or PIL image -> the encoder's input."""
        if not hasattr(image, "getbands"):
            image = open_image(image)
        return preprocess(image, self.image_settings)

    def new_cache(self, length: int, ids=None, images=()) -> VisionKVCache:
        """The self-attention cache, with the images' keys and values for every cross layer
        when the prompt `ids` has images (one per <|image|> token)."""
        cache = VisionKVCache.allocate(self.config, length, skip=self.cross_layers)
        cache.cross = self.cross_layers
        if ids is not None:
            self._spans(ids, len(images))  # a miscount fails before any image is encoded
        self.vision_seconds = 0.0
        if images:
            self.attach(cache, ids, [self.encode(self.pixels(image)) for image in images])
        return cache

    def _spans(self, ids, count: int) -> list[tuple[int, int]]:
        spans = image_spans(list(ids), self.image_token_id)
        if len(spans) != count:
            raise ImageError(f"the prompt has {len(spans)} <|image|> token(s) but {count} image(s) were "
                             f"given: put one <|image|> where each image belongs")
        return spans

    def encode(self, pixels: Pixels) -> EncodedImage:
        """The image encoder, then each cross layer's keys and values of its features."""
        return finish(self.encoding(pixels))

    def encoding(self, pixels: Pixels):
        """encode a piece at a time: a generator yielding after each of the encoder's layers
        (VisionEncoder.pieces), whose return value is the EncodedImage."""
        started = time.perf_counter()  # to the end, pauses and all (the CLI makes none)
        features = yield from self.encoder.pieces(pixels.values, pixels.aspect_ratio_id, pixels.tiles)
        c = self.config
        n = features.shape[0]
        keys, values = {}, {}
        for i in sorted(self.cross_layers):
            p = f"layers.{i}.cross_attention."
            k = nn.linear(features, self.w(p + "wk.weight")).reshape(n, c.n_kv_heads, c.head_dim)
            k = nn.rms_norm(k, self.w(p + "k_norm.weight"), c.norm_eps)
            val = nn.linear(features, self.w(p + "wv.weight")).reshape(n, c.n_kv_heads, c.head_dim)
            keys[i], values[i] = k.transpose(0, 1).contiguous(), val.transpose(0, 1).contiguous()
        made = [*keys.values(), *values.values()]
        made[0].realize(*made[1:])
        self.vision_seconds += time.perf_counter() - started
        return EncodedImage(keys, values, pixels.tiles)

    def attach(self, cache: VisionKVCache, ids, images: list[EncodedImage]) -> None:
        """Point the cache's cross layers at the images of the prompt `ids`, in the order of its
        <|image|> tokens (none: the cross layers are skipped)."""
        spans = self._spans(ids, len(images))
        if not images:
            for i in self.cross_layers:
                cache.keys[i] = cache.values[i] = None
            cache.first = cache.end = None
            return
        for i in self.cross_layers:
            keys, values = [im.keys[i] for im in images], [im.values[i] for im in images]
            cache.keys[i] = keys[0].cat(*keys[1:], axis=1).contiguous() if len(keys) > 1 else keys[0]
            cache.values[i] = values[0].cat(*values[1:], axis=1).contiguous() if len(values) > 1 else values[0]
        v = self.mllama.vision
        first = np.zeros((len(images), v.max_tiles, v.patches), np.int64)
        end = np.zeros_like(first)  # padding tiles: [0, 0) holds no position
        for j, ((a, b), image) in enumerate(zip(spans, images)):
            first[j, :image.tiles], end[j, :image.tiles] = a, NEVER if b == -1 else b
        cache.first, cache.end = Tensor(first.reshape(-1)), Tensor(end.reshape(-1))
        made = [cache.keys[i] for i in self.cross_layers] + [cache.values[i] for i in self.cross_layers]
        made[0].realize(*made[1:])

    # ---- the cross-attention block ------------------------------------------------------------
    def block(self, i: int, x: Tensor, start: Tensor, positions: Tensor, cache) -> Tensor:
        if i not in self.cross_layers:
            return super().block(i, x, start, positions, cache)
        if not isinstance(cache, KVCache):  # a batch of text sequences (forward_batch): the engine
            return x                           # decodes a sequence with images alone
        if cache.keys[i] is None:
            return x  # no image in this prompt: the layer is skipped
        c, p, eps = self.config, f"layers.{i}.", self.config.norm_eps
        seq, n = x.shape[0], cache.first.shape[0]
        pos = positions.reshape(seq, 1)
        visible = (cache.first.reshape(1, n) <= pos).where(pos < cache.end.reshape(1, n), False)
        seen = visible.cast(x.dtype).max(-1, keepdim=True)  # [seq, 1]: 1 where the row sees an image
        mask = (seen == 0).where(True, visible)  # a row that sees nothing attends anywhere, then is zeroed

        h = nn.rms_norm(x, self.w(p + "attention_norm.weight"), eps)
        q = nn.linear(h, self.w(p + "cross_attention.wq.weight")).reshape(seq, c.n_heads, c.head_dim)
        q = nn.rms_norm(q, self.w(p + "cross_attention.q_norm.weight"), eps)
        out = nn.scaled_dot_product_attention(q.transpose(0, 1), cache.keys[i], cache.values[i], attn_mask=mask)
        out = nn.linear(out.transpose(0, 1).reshape(seq, c.n_heads * c.head_dim),
                        self.w(p + "cross_attention.wo.weight"))
        x = x + self.w(p + "cross_attention_gate").tanh() * (out * seen)
        h = self.mlp(i, nn.rms_norm(x, self.w(p + "ffn_norm.weight"), eps))
        return x + self.w(p + "cross_mlp_gate").tanh() * (h * seen)
