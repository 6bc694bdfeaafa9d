"""Write Llama checkpoints with random weights in the exact on-disk layouts users have, for
tests and benchmarks:

    python -m tools.make_checkpoint --size 1b --layout hf --dtype bfloat16 OUT_FOLDER
    python -m tools.make_checkpoint --size 1b --layout meta OUT_FOLDER     (needs torch)
    python -m tools.make_checkpoint --size 1b --layout gguf --dtype float16 OUT.gguf   (llama.cpp's layout)
    python -m tools.make_checkpoint --size 8b --layout gguf --dtype q4_0 OUT.gguf      (quantised blocks)

Weights come in Meta's names and layout (models.formats.checkpoint.random_weights); each writer turns
them into its format, including Hugging Face's permuted q/k rows and Meta's shards.
"""
import argparse
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.formats import checkpoint, hf, meta
from models.formats.assets import fetch
from models.formats.gguf_writer import write_gguf
from models.llama3.config import META_FFN, SIZES, LlamaConfig, meta_ffn_dim, size_of
from models.text.tokenizer import Llama3Tokenizer
from ops import dtypes
from tinytensor.state import safetensors_file

HF_FROM_META = {meta: hf for hf, meta in hf.NAMES.items()}
HF_TOP_FROM_META = {meta: hf for hf, meta in hf.TOP.items()}


def permute_for_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved q/k rows -> HF's rotate-half order (HF's own conversion script)."""
    rows, cols = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3)
                                .reshape(rows, cols))


def hf_config(c: LlamaConfig, dtype: dtypes.DType) -> dict:
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
         "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
         "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps,
         "rope_theta": c.rope_theta, "max_position_embeddings": c.max_context, "head_dim": c.head_dim,
         "tie_word_embeddings": c.tied_embeddings, "torch_dtype": dtype.name, "hidden_act": "silu",
         "bos_token_id": 128000, "eos_token_id": 128001}
    if c.rope_scaling:
        s = c.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_context}
    return d


def write_hf(folder: Path, c: LlamaConfig, weights: dict[str, np.ndarray], dtype=dtypes.bfloat16,
             shard_bytes: int = 5 << 30):
    """config.json + model.safetensors, or model-0000x-of-0000y.safetensors with an index
    when the weights exceed shard_bytes, as transformers' save_pretrained does. Each tensor is
    read from `weights` and converted only as it is written."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}  # HF name -> (function making the stored array, shape, dtype)
    for name in weights:
        hf_name, heads = _hf_name(c, name)

        def make(name=name, heads=heads):
            w = weights[name]
            return dtypes.narrow(permute_for_hf(w, heads) if heads else w, dtype)
        tensors[hf_name] = (make, weights[name].shape, dtype)
    (folder / "config.json").write_text(json.dumps(hf_config(c, dtype), indent=2))
    nbytes = {name: math.prod(shape) * dtype.itemsize for name, (_, shape, _) in tensors.items()}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + nbytes[name] > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes[name]
    shards.append(current)
    if len(shards) == 1:
        safetensors_file.write(folder / "model.safetensors", shards[0], {"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        safetensors_file.write(folder / fname, shard, {"format": "pt"})
        weight_map.update({name: fname for name in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, indent=2))


def _hf_name(c: LlamaConfig, name: str) -> tuple[str, int | None]:
    """A Meta weight's HF name, and the head count to permute its rows by (q and k only)."""
    if not name.startswith("layers."):
        return HF_TOP_FROM_META[name], None
    _, i, rest = name.split(".", 2)
    heads = {"attention.wq.weight": c.n_heads, "attention.wk.weight": c.n_kv_heads}.get(rest)
    return f"model.layers.{i}.{HF_FROM_META[rest]}", heads


def write_meta(folder: Path, c: LlamaConfig, weights: dict[str, np.ndarray], dtype=dtypes.bfloat16,
               shards: int = 1, ffn: tuple[int, float | None] | None = None):
    """params.json + consolidated.NN.pth, split across `shards` as Meta's model parallelism
    splits them. Uses torch.save: the real writer makes the real format. `ffn` is
    (multiple_of, ffn_dim_multiplier) giving c.ffn_dim (known for the published sizes)."""
    import torch

    multiple_of, ffn_dim_multiplier = ffn or META_FFN[size_of(c)]
    if meta_ffn_dim(c.dim, multiple_of, ffn_dim_multiplier) != c.ffn_dim:
        raise ValueError(f"multiple_of={multiple_of}, ffn_dim_multiplier={ffn_dim_multiplier} do not give "
                         f"ffn_dim {c.ffn_dim}")
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype.name]
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "vocab_size": c.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier,
              "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "use_scaled_rope": c.rope_scaling is not None}
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    for k in range(shards):
        state = {}
        for name, w in weights.items():
            axis = meta.SHARD_AXIS.get(name.split(".")[-2])
            part = w if axis is None or shards == 1 else np.split(w, shards, axis=axis)[k]
            state[name] = torch.from_numpy(np.ascontiguousarray(part)).to(torch_dtype)
        torch.save(state, folder / f"consolidated.{k:02d}.pth")


# Not a published size: the Llama 3.2 layout (real vocabulary, tied head, RoPE factor 32) at a
# size that writes in a second, for tests and for trying the tools.
TINY = replace(SIZES["1b"], dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, head_dim=0,
               name="Llama-3.2-tiny")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.make_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder (hf, meta) or .gguf file to create; never overwritten")
    p.add_argument("--size", choices=[*SIZES, "tiny"], required=True,
                   help="a published size, or tiny (the 3.2 layout at dim 64, 2 layers)")
    p.add_argument("--layout", choices=["hf", "meta", "gguf"], required=True, help="the on-disk format")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", *(d.name for d in dtypes.BLOCKS)],
                   default="bfloat16", help="the weights' dtype; the block types (q8_0, q4_0, ...) are for "
                                            "--layout gguf (default: bfloat16)")
    p.add_argument("--shards", type=int, default=1, help="Meta layout: model-parallel shards")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed (default: 0)")
    args = p.parse_args(argv)
    if dtypes.to_dtype(args.dtype).block and args.layout != "gguf":
        p.error(f"--dtype {args.dtype} is a GGUF block type: use it with --layout gguf")
    if args.out.exists():
        print(f"error: {args.out} exists; choose a new path (nothing was overwritten)", file=sys.stderr)
        return 2
    c = TINY if args.size == "tiny" else SIZES[args.size]
    weights = checkpoint.RandomArrays(c, args.seed)  # made one tensor at a time, as written
    dtype = dtypes.to_dtype(args.dtype)
    # each layout gets the real Llama 3 tokenizer, so that the checkpoint runs as it is
    tokenizer_model = fetch("llama3-tokenizer")
    if args.layout == "hf":
        write_hf(args.out, c, weights, dtype)
        (args.out / "original").mkdir()
        shutil.copyfile(tokenizer_model, args.out / "original" / "tokenizer.model")  # where Meta's HF repos keep it
    elif args.layout == "meta":
        write_meta(args.out, c, weights, dtype, args.shards, ffn=(64, None) if args.size == "tiny" else None)
        shutil.copyfile(tokenizer_model, args.out / "tokenizer.model")
    else:
        write_gguf(args.out, c, weights, Llama3Tokenizer(tokenizer_model), dtype)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
