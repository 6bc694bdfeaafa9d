"""Llama 3.2 Vision checkpoints: Hugging Face names to ours, and every weight's shape.

The text model takes the Llama names (`layers.N.attention.wq.weight`, ...) and, in its cross
layers, `layers.N.cross_attention.{wq,wk,wv,wo,q_norm,k_norm}.weight`,
`layers.N.cross_attention_gate` and `layers.N.cross_mlp_gate`; the image encoder and projector
keep Hugging Face's names. Both of transformers' layouts are read: the hub's files
(`language_model.model.*`, `language_model.lm_head.weight`, `vision_model.*`) and what
transformers >= 5 saves (`model.language_model.*`, `lm_head.weight`, `model.vision_model.*`).
"""
from models.llama3.vision_config import MllamaConfig

CROSS_NAMES = {  # after "layers.N." in a cross layer
    "cross_attn.q_proj.weight": "cross_attention.wq.weight", "cross_attn.k_proj.weight": "cross_attention.wk.weight",
    "cross_attn.v_proj.weight": "cross_attention.wv.weight", "cross_attn.o_proj.weight": "cross_attention.wo.weight",
    "cross_attn.q_norm.weight": "cross_attention.q_norm.weight",
    "cross_attn.k_norm.weight": "cross_attention.k_norm.weight",
    "cross_attn_attn_gate": "cross_attention_gate", "cross_attn_mlp_gate": "cross_mlp_gate",
}
PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."), ("model.vision_model.", "vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."))


def text_form(name: str) -> str:
    """A Vision checkpoint's name in the text model's Hugging Face form (`model.layers.N...`,
    `lm_head.weight`), or unchanged for the image encoder and projector."""
    for old, new in PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def stays_float(name: str) -> bool:
    """Embedding tables of the image encoder are read by row or added whole, never multiplied
    as x @ W.T: they keep their float type when the rest is quantised."""
    return name.startswith("vision_model.") and "embedding" in name


def expected_shapes(c: MllamaConfig, text_shapes) -> dict[str, tuple[int, ...]]:
    t, v = c.text, c.vision
    shapes = {}
    for name, shape in text_shapes(t).items():
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if layer is not None and int(layer) in c.cross_attention_layers and ".attention." in name:
            continue
        shapes[name] = shape
    shapes["tok_embeddings.weight"] = (t.vocab_size + c.extra_tokens, t.dim)
    for i in c.cross_attention_layers:
        p = f"layers.{i}.cross_attention."
        shapes.update({p + "wq.weight": (t.n_heads * t.head_dim, t.dim),
                       p + "wk.weight": (t.n_kv_heads * t.head_dim, t.dim),
                       p + "wv.weight": (t.n_kv_heads * t.head_dim, t.dim),
                       p + "wo.weight": (t.dim, t.n_heads * t.head_dim),
                       p + "q_norm.weight": (t.head_dim,), p + "k_norm.weight": (t.head_dim,),
                       f"layers.{i}.cross_attention_gate": (1,), f"layers.{i}.cross_mlp_gate": (1,)})
    d, ids, P, T = v.dim, len(v.aspect_ratios) + 1, v.patches, v.max_tiles
    e = "vision_model."
    shapes.update({e + "patch_embedding.weight": (d, v.channels, v.patch_size, v.patch_size),
                   e + "class_embedding": (d,),
                   e + "gated_positional_embedding.embedding": (P, d),
                   e + "gated_positional_embedding.gate": (1,),
                   e + "gated_positional_embedding.tile_embedding.weight": (ids, T * P * d),
                   e + "pre_tile_positional_embedding.embedding.weight": (ids, T * d),
                   e + "pre_tile_positional_embedding.gate": (1,),
                   e + "post_tile_positional_embedding.embedding.weight": (ids, T * d),
                   e + "post_tile_positional_embedding.gate": (1,),
                   e + "layernorm_pre.weight": (d,), e + "layernorm_pre.bias": (d,),
                   e + "layernorm_post.weight": (d,), e + "layernorm_post.bias": (d,),
                   "multi_modal_projector.weight": (t.dim, v.output_dim), "multi_modal_projector.bias": (t.dim,)})
    stacks = [("transformer", i, False) for i in range(v.n_layers)] + \
             [("global_transformer", i, True) for i in range(v.n_global_layers)]
    for stack, i, gated in stacks:
        p = f"{e}{stack}.layers.{i}."
        shapes.update({p + f"self_attn.{x}_proj.weight": (d, d) for x in "qkvo"})
        shapes.update({p + "mlp.fc1.weight": (v.ffn_dim, d), p + "mlp.fc1.bias": (v.ffn_dim,),
                       p + "mlp.fc2.weight": (d, v.ffn_dim), p + "mlp.fc2.bias": (d,),
                       p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
                       p + "post_attention_layernorm.weight": (d,), p + "post_attention_layernorm.bias": (d,)})
        if gated:
            shapes.update({p + "gate_attn": (1,), p + "gate_ffn": (1,)})
    return shapes
