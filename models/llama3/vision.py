"""Llama 3.2 Vision's image encoder, written against the Tensor API only.

    tiles -> patches (a conv as a matmul) + tile embedding -> [class] + positions
          -> pre-LayerNorm -> local transformer (the inputs of some layers kept)
          -> post-LayerNorm + tile embedding -> global transformer (tanh-gated)
          -> [final, kept intermediates] per patch -> multi-modal projector -> text width

All max_tiles tiles run, the image's own and the zero padding tiles, and each tile's patches are
padded to a multiple of 8 tokens; attention masks only padding-to-padding pairs (real tokens
attend to padding), as the reference does. Weights keep Hugging Face's names under
`vision_model.` and `multi_modal_projector.`.
"""
import math

import numpy as np

from models.llama3.vision_config import VisionConfig
from tinytensor import Tensor, nn


class VisionEncoder:
    def __init__(self, config: VisionConfig, weights: dict[str, Tensor]):
        self.config, self.weights = config, weights

    def w(self, name: str) -> Tensor:
        return self.weights["vision_model." + name]

    def layer(self, p: str, x: Tensor, visible: Tensor, gated: bool) -> Tensor:
        """One pre-norm transformer layer over [tokens, dim]; gated: the global layers scale
        their attention and MLP by tanh of a learned scalar."""
        c, eps = self.config, self.config.norm_eps
        h = nn.layer_norm(x, self.w(p + "input_layernorm.weight"), self.w(p + "input_layernorm.bias"), eps)
        n = h.shape[0]
        q, k, v = (nn.linear(h, self.w(f"{p}self_attn.{name}_proj.weight")).reshape(n, c.n_heads, c.head_dim)
                   .transpose(0, 1) for name in "qkv")
        out = nn.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        out = nn.linear(out.transpose(0, 1).reshape(n, c.dim), self.w(p + "self_attn.o_proj.weight"))
        x = x + (self.w(p + "gate_attn").tanh() * out if gated else out)
        h = nn.layer_norm(x, self.w(p + "post_attention_layernorm.weight"),
                          self.w(p + "post_attention_layernorm.bias"), eps)
        h = nn.linear(h, self.w(p + "mlp.fc1.weight"), self.w(p + "mlp.fc1.bias")).gelu()
        h = nn.linear(h, self.w(p + "mlp.fc2.weight"), self.w(p + "mlp.fc2.bias"))
        return x + (self.w(p + "gate_ffn").tanh() * h if gated else h)

    def tile_embedding(self, name: str, ratio_id: int) -> Tensor:
        """This aspect ratio's row of a tile embedding, per tile: [tiles, 1 or patches, dim]."""
        return self.w(name)[ratio_id].reshape(self.config.max_tiles, -1, self.config.dim)

    def __call__(self, pixels: np.ndarray, ratio_id: int, tiles: int) -> Tensor:
        """Features [max_tiles * patches, output_dim] of one image: pixels [max_tiles, 3, S, S]
        with its first `tiles` tiles real, the arrangement numbered ratio_id."""
        return finish(self.pieces(pixels, ratio_id, tiles))

    def pieces(self, pixels: np.ndarray, ratio_id: int, tiles: int):
        """The encoder a layer at a time: a generator that computes each layer's output and
        yields before the next (a server decodes its other streams there: the 11B's encoder is
        40 layers of seconds each on a few cores); it returns the features as __call__ does.
        A layer's output is computed whole either way: the same bits as one pass."""
        c = self.config
        T, P, D, grid, ps = c.max_tiles, c.patches, c.dim, c.image_size // c.patch_size, c.patch_size
        padded = 8 * math.ceil(P / 8)

        x = Tensor(pixels).reshape(T, c.channels, grid, ps, grid, ps).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(T, grid * grid, c.channels * ps * ps)  # each patch unfolded as the conv reads it
        x = nn.linear(x, self.w("patch_embedding.weight").reshape(D, c.channels * ps * ps))
        x = x + self.w("pre_tile_positional_embedding.gate").tanh() * \
            self.tile_embedding("pre_tile_positional_embedding.embedding.weight", ratio_id)
        x = self.w("class_embedding").reshape(1, 1, D).expand(T, 1, D).cat(x, axis=1)
        gate = self.w("gated_positional_embedding.gate").tanh()
        x = x + (1 - gate) * self.w("gated_positional_embedding.embedding")
        x = x + gate * self.tile_embedding("gated_positional_embedding.tile_embedding.weight", ratio_id)
        x = nn.layer_norm(x, self.w("layernorm_pre.weight"), self.w("layernorm_pre.bias"), 1e-5)
        x = x.pad((None, (0, padded - P), None)).reshape(T * padded, D)

        is_pad = np.ones((T, padded), bool)
        is_pad[:tiles, :P] = False
        is_pad = is_pad.reshape(-1)
        visible = Tensor(~(is_pad[:, None] & is_pad[None, :]))

        kept = []
        for i in range(c.n_layers):
            if i in c.intermediate_layers:
                kept.append(x)  # the layer's input, as Meta's reference keeps it
            x = self.layer(f"transformer.layers.{i}.", x, visible, gated=False).realize()
            yield
        x = nn.layer_norm(x, self.w("layernorm_post.weight"), self.w("layernorm_post.bias"), 1e-5)
        x = x.reshape(T, padded, D) + self.w("post_tile_positional_embedding.gate").tanh() * \
            self.tile_embedding("post_tile_positional_embedding.embedding.weight", ratio_id)
        x = x.reshape(T * padded, D)
        for i in range(c.n_global_layers):
            x = self.layer(f"global_transformer.layers.{i}.", x, visible, gated=True).realize()
            yield

        # per patch: the final state, then the kept states interleaved feature by feature
        # (transformers stacks them on a last axis and flattens it)
        features = x.reshape(T, padded, D)
        if kept:
            features = features.cat(kept[0].stack(*kept[1:], axis=-1).reshape(T, padded, D * len(kept)), axis=-1)
        features = features[:, :P].reshape(T * P, c.output_dim)
        return nn.linear(features, self.weights["multi_modal_projector.weight"],
                         self.weights["multi_modal_projector.bias"])


def finish(pieces):
    """Run a generator of pieces of work (VisionEncoder.pieces) to its end: its return value."""
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value
