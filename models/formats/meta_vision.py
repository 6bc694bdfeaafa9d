"""Llama 3.2 Vision in Meta's layout (`llama model download`: params.json with vision_* fields
and consolidated.NN.pth), the names of llama-models' CrossAttentionTransformer, into ours
(models/formats/vision_checkpoint.py: the text model's Meta names, the encoder's Hugging Face ones).

Where Meta's layout differs beyond names:
- the text model's self-attention layers (`text_model.layers.N`) and its cross-attention layers
  (`text_model.cross_attention_layers.M`) are two lists: cross layer M runs just before self
  layer schedule[M] (`fusion_schedule`), so in one list it is layer schedule[M] + M;
- the image token's embedding row is `text_model.learnable_embedding` (8 rows past the vocabulary);
- the tile embeddings are a grid [max_tiles, max_tiles, tokens, dim] that an image of h x w tiles
  reads as its [:h, :w] corner, where ours (and Hugging Face's) keep one row per aspect ratio;
- the patch embedding is a linear layer over unfolded patches (the conv's weight, flattened).
params.json does not give the encoder's shape: Meta's code fixes it (32 local layers, 8 global,
16 heads, the inputs of layers 3, 7, 15, 23 and 30 kept, MLP 4x); its width is read off the
class embedding (1,280 in the published models).
"""
import math
import re
from dataclasses import replace

import numpy as np

from models.llama3 import config as configs
from models.llama3.vision_config import VISION_SIZES, MllamaConfig, VisionConfig
from tinytensor.state import CheckpointError

# Meta's model-parallel shards (fairscale): column-parallel layers and vocabulary-parallel
# embeddings split their first axis, row-parallel layers their second; the rest is replicated.
SPLIT_FIRST = re.compile(r"(attention|attn)\.w[qkv]\.weight$|feed_forward\.w[13]\.weight$|text_model\.output\.weight$|"
                         r"(tok|learnable)_embeddings?\.weight$|mlp\.c_fc\.(weight|bias)$|conv1\._linear\.weight$|"
                         r"vision_projection\.(weight|bias)$")
SPLIT_SECOND = re.compile(r"(attention|attn)\.wo\.weight$|feed_forward\.w2\.weight$|mlp\.c_proj\.weight$")

TEXT_CROSS = {  # after text_model.cross_attention_layers.M.
    "attention.wq.weight": "cross_attention.wq.weight", "attention.wk.weight": "cross_attention.wk.weight",
    "attention.wv.weight": "cross_attention.wv.weight", "attention.wo.weight": "cross_attention.wo.weight",
    "attention.q_norm.weight": "cross_attention.q_norm.weight",
    "attention.k_norm.weight": "cross_attention.k_norm.weight",
    "gate_attn": "cross_attention_gate", "gate_ffwd": "cross_mlp_gate",
}
ENCODER = {  # vision_model.vision_encoder.X -> vision_model.Y
    "class_embedding": "class_embedding",
    "positional_embedding": "gated_positional_embedding.embedding",
    "gated_positional_embedding_gate": "gated_positional_embedding.gate",
    "gated_positional_embedding": "gated_positional_embedding.tile_embedding.weight",
    "pre_tile_pos_embed.embedding": "pre_tile_positional_embedding.embedding.weight",
    "pre_tile_pos_embed.gate": "pre_tile_positional_embedding.gate",
    "post_tile_pos_embed.embedding": "post_tile_positional_embedding.embedding.weight",
    "post_tile_pos_embed.gate": "post_tile_positional_embedding.gate",
    "ln_pre.weight": "layernorm_pre.weight", "ln_pre.bias": "layernorm_pre.bias",
    "ln_post.weight": "layernorm_post.weight", "ln_post.bias": "layernorm_post.bias",
}
BLOCK = {  # after (global_)transformer.resblocks.N.
    "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
    "ln_1.weight": "input_layernorm.weight", "ln_1.bias": "input_layernorm.bias",
    "ln_2.weight": "post_attention_layernorm.weight", "ln_2.bias": "post_attention_layernorm.bias",
    "gate_attn": "gate_attn", "gate_ffn": "gate_ffn",
}
GRIDS = ("gated_positional_embedding", "pre_tile_pos_embed.embedding", "post_tile_pos_embed.embedding")


def is_vision(params: dict) -> bool:
    return isinstance(params, dict) and isinstance(params.get("vision_chunk_size"), int) \
        and params["vision_chunk_size"] > 0


def split_axis(name: str) -> int | None:
    """The axis Meta's model-parallel shards split this weight along (None: replicated)."""
    return 0 if SPLIT_FIRST.search(name) else 1 if SPLIT_SECOND.search(name) else None


def fusion_schedule(n_layers: int, n_cross: int) -> list[int]:
    """The self-attention layers a cross layer runs before, spread evenly and ending at the last."""
    step = math.ceil(n_layers / n_cross)
    return list(range(n_layers))[::-1][::step][:n_cross][::-1]


def config(params: dict, vocab_size: int | None, width: int) -> MllamaConfig:
    n_cross = configs._typed(params.get("vision_num_cross_attention_layers"), "vision_num_cross_attention_layers", int)
    text = configs.from_meta(params, vocab_size)
    if not 1 <= n_cross <= text.n_layers:
        raise configs.ConfigError(f"vision_num_cross_attention_layers is {n_cross}: it must be in [1, n_layers]")
    cross = tuple(s + m for m, s in enumerate(fusion_schedule(text.n_layers, n_cross)))
    text = replace(text, n_layers=text.n_layers + n_cross, tied_embeddings=False)
    known = next((c for c in VISION_SIZES.values() if c.text.dim == text.dim and c.text.n_layers == text.n_layers), None)
    text = replace(text, name=known.text.name if known else "mllama")
    vision = VisionConfig(dim=width, ffn_dim=4 * width, output_dim=6 * width,
                          image_size=configs._typed(params.get("vision_chunk_size"), "vision_chunk_size", int),
                          max_tiles=configs._typed(params.get("vision_max_num_chunks"), "vision_max_num_chunks", int, 4))
    return MllamaConfig(text, cross, vision)


def width_of(arrays: dict, folder) -> int:
    found = arrays.get("vision_model.vision_encoder.class_embedding")
    if found is None or found[0].ndim != 1:
        raise CheckpointError(f"{folder}: params.json describes a Vision model but the weights have no "
                              f"vision_model.vision_encoder.class_embedding vector: a shard is missing or damaged")
    return int(found[0].shape[0])


def ours(c: MllamaConfig, arrays: dict, folder) -> dict:
    """Meta's names and layouts -> ours; a name we do not know is left out (the shape check
    then names what is missing)."""
    n_self = c.text.n_layers - len(c.cross_attention_layers)
    cross = sorted(c.cross_attention_layers)
    self_layers = [i for i in range(c.text.n_layers) if i not in c.cross_attention_layers]
    out = {}
    for name, value in arrays.items():
        if name in ("text_model.tok_embeddings.weight", "text_model.learnable_embedding.weight"):
            continue
        m = re.fullmatch(r"text_model\.layers\.(\d+)\.(.+)", name)
        if m and int(m[1]) < n_self:
            out[f"layers.{self_layers[int(m[1])]}.{m[2]}"] = value
            continue
        m = re.fullmatch(r"text_model\.cross_attention_layers\.(\d+)\.(.+)", name)
        if m and int(m[1]) < len(cross):
            out[f"layers.{cross[int(m[1])]}.{TEXT_CROSS.get(m[2], m[2])}"] = value
            continue
        if name in ("text_model.norm.weight", "text_model.output.weight"):
            out[name[len("text_model."):]] = value
            continue
        if name.startswith("vision_model.vision_projection."):
            out["multi_modal_projector." + name.rsplit(".", 1)[1]] = value
            continue
        m = re.fullmatch(r"vision_model\.vision_encoder\.((?:global_)?transformer)\.resblocks\.(\d+)\.(.+)", name)
        if m and m[3] in BLOCK:
            out[f"vision_model.{m[1]}.layers.{m[2]}.{BLOCK[m[3]]}"] = value
            continue
        inner = name[len("vision_model.vision_encoder."):] if name.startswith("vision_model.vision_encoder.") else None
        if inner == "conv1._linear.weight":  # the conv's weight, its (channel, row, column) flattened
            v, (w, dt) = c.vision, value
            out["vision_model.patch_embedding.weight"] = (w.reshape(w.shape[0], v.channels, v.patch_size, v.patch_size)
                                                          if w.ndim == 2 and w.shape[1] == v.channels * v.patch_size ** 2
                                                          else w, dt)
        elif inner in GRIDS:
            out["vision_model." + ENCODER[inner]] = (per_aspect_ratio(value[0], c.vision, f"{folder}: {name}"), value[1])
        elif inner in ENCODER:
            out["vision_model." + ENCODER[inner]] = value
    out["tok_embeddings.weight"] = _embedding(arrays, folder)
    return out


def _embedding(arrays: dict, folder):
    """The vocabulary's rows, then the learnable rows past it (the image token's first)."""
    (vocab, dt), extra = arrays.get("text_model.tok_embeddings.weight", (None, None)), \
        arrays.get("text_model.learnable_embedding.weight")
    if vocab is None or extra is None or extra[1] != dt or extra[0].ndim != 2 or vocab.ndim != 2 \
            or extra[0].shape[1] != vocab.shape[1]:
        raise CheckpointError(f"{folder}: text_model.tok_embeddings.weight or text_model.learnable_embedding.weight "
                              f"is missing or they do not fit together: a shard is damaged or from another model")
    return np.concatenate([vocab, extra[0]]), dt


def per_aspect_ratio(grid: np.ndarray, v: VisionConfig, what: str) -> np.ndarray:
    """A tile embedding grid [tiles, tiles, tokens, dim] as one row per aspect ratio
    [1 + ratios, tiles * tokens * dim]: ratio (h, w) puts grid[:h, :w] in its first h * w tiles,
    zeros in the rest (and row 0, no ratio, is zeros), as Meta's code reads the grid."""
    T = v.max_tiles
    if grid.ndim != 4 or grid.shape[:2] != (T, T):
        raise CheckpointError(f"{what} has shape {tuple(grid.shape)}, not [{T}, {T}, tokens, width]")
    ratios = v.aspect_ratios
    rows = np.zeros((len(ratios) + 1, T, *grid.shape[2:]), grid.dtype)
    for j, (h, w) in enumerate(ratios, start=1):
        rows[j, :h * w] = grid[:h, :w].reshape(h * w, *grid.shape[2:])
    return rows.reshape(len(ratios) + 1, -1)
