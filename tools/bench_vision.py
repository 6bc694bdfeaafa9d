"""Llama 3.2 Vision's image encoder at its true shape, random weights: seconds per image, beside
transformers' MllamaVisionModel (PyTorch CPU, float32) on the same encoder and image in the same
run when it is installed.

    python -m tools.bench_vision [--size 11b] [--dtype q4_0] [--layers 2] [--image photo.jpg] [--no-peer]
    python -m tools.bench_vision --parts       # a layer's attention and products apart, float32

The encoder runs all its tiles (4 x 1608 tokens) through every layer, so its cost is the same for
any image. With --layers k it runs k local layers and k global ones (of 32 and 8), and the
per-layer times are scaled up to the whole encoder, saying so, to keep a run short. The peer has
its own random weights (speed does not depend on the values); compare float32 with float32.
--parts times a layer's attention (every head, the encoder's padding mask) and its products
(one of q/k/v/o, fc1 with its bias and GELU, fc2) apart, each beside PyTorch's own op on the same float32
arrays (medians of 3 after a warm-up).
"""
import argparse
import time
from dataclasses import replace

import numpy as np

from models.formats import checkpoint
from models.llama3.images import ImageSettings, open_image, preprocess
from models.llama3.vision import VisionEncoder
from models.llama3.vision_config import VISION_SIZES
from ops import dtypes
from tools.bench_ops import median_seconds


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.bench_vision", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(VISION_SIZES), default="11b")
    p.add_argument("--dtype", default="q4_0", help="the encoder's matrices (default q4_0)")
    p.add_argument("--layers", type=int, default=0, help="local and global layers to run (0: all)")
    p.add_argument("--image", help="an image file (default: a random 900 x 1200 picture)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--parts", action="store_true", help="time a layer's attention and products apart (float32)")
    args = p.parse_args(argv)
    full = VISION_SIZES[args.size]
    v = full.vision
    if args.parts:
        return parts(v, peer=not args.no_peer)
    local, glob = (args.layers, min(args.layers, v.n_global_layers)) if args.layers else (v.n_layers, v.n_global_layers)
    kept = tuple(i for i in v.intermediate_layers if i < local)
    vision = replace(v, n_layers=local, n_global_layers=glob, intermediate_layers=kept,
                     output_dim=v.dim * (1 + len(kept)))
    config = replace(full, vision=vision)
    weights = checkpoint.random_weights(config, dtype=dtypes.to_dtype(args.dtype),
                                        only=lambda n: n.startswith(("vision_model.", "multi_modal_projector.")))
    if args.image:
        image = open_image(args.image)
    else:
        from PIL import Image
        image = Image.fromarray((np.random.default_rng(0).random((900, 1200, 3)) * 255).astype(np.uint8))
    t0 = time.perf_counter()
    px = preprocess(image, ImageSettings(v.image_size, v.max_tiles))
    t1 = time.perf_counter()
    VisionEncoder(vision, weights)(px.values, px.aspect_ratio_id, px.tiles).realize()
    t2 = time.perf_counter()
    ran = local + glob
    print(f"{args.size} encoder, {args.dtype}, {px.tiles} of {v.max_tiles} tiles real: preprocessing {t1 - t0:.2f} s, "
          f"{ran} layers in {t2 - t1:.1f} s ({(t2 - t1) / ran:.1f} s per layer)")
    if ran < v.n_layers + v.n_global_layers:
        print(f"whole encoder ({v.n_layers} + {v.n_global_layers} layers), scaled from these: "
              f"{(t2 - t1) / ran * (v.n_layers + v.n_global_layers):.0f} s per image")
    theirs = None if args.no_peer else transformers_seconds(vision, px)
    if theirs is None:
        print("transformers: not installed or --no-peer; no peer figure")
    else:
        print(f"transformers MllamaVisionModel (PyTorch, float32): {ran} layers in {theirs:.1f} s "
              f"({theirs / ran:.1f} s per layer); ours ({args.dtype}) {theirs / (t2 - t1):.2f}x its speed")


def parts(v, peer: bool) -> None:
    """A layer's kernels at the encoder's shape, float32, ours beside PyTorch's (GFLOP/s)."""
    from tinytensor import Tensor, nn
    rng = np.random.default_rng(0)
    padded = 8 * -(-v.patches // 8)
    n, d, heads, head_dim = v.max_tiles * padded, v.dim, v.n_heads, v.head_dim
    is_pad = np.ones((v.max_tiles, padded), bool)
    is_pad[:, :v.patches] = False
    visible = ~(is_pad.reshape(-1)[:, None] & is_pad.reshape(-1)[None, :])
    arrays = {"x": rng.standard_normal((n, d), dtype=np.float32),
              "q": rng.standard_normal((heads, n, head_dim), dtype=np.float32),
              "k": rng.standard_normal((heads, n, head_dim), dtype=np.float32),
              "v": rng.standard_normal((heads, n, head_dim), dtype=np.float32),
              "w": rng.standard_normal((d, d), dtype=np.float32) * 0.02,
              "fc1": rng.standard_normal((v.ffn_dim, d), dtype=np.float32) * 0.02,
              "fc2": rng.standard_normal((d, v.ffn_dim), dtype=np.float32) * 0.02,
              "h": rng.standard_normal((n, v.ffn_dim), dtype=np.float32),
              "b1": rng.standard_normal(v.ffn_dim, dtype=np.float32) * 0.02}
    ours = {name: Tensor(a).realize() for name, a in arrays.items()}
    mask = Tensor(visible).realize()
    ops = [("attention", 4 * heads * n * n * head_dim,
            lambda: nn.scaled_dot_product_attention(ours["q"], ours["k"], ours["v"], attn_mask=mask).realize()),
           ("q projection", 2 * n * d * d, lambda: nn.linear(ours["x"], ours["w"]).realize()),
           ("fc1 + GELU", 2 * n * d * v.ffn_dim, lambda: nn.linear(ours["x"], ours["fc1"], ours["b1"]).gelu().realize()),
           ("fc2", 2 * n * d * v.ffn_dim, lambda: nn.linear(ours["h"], ours["fc2"]).realize())]
    theirs = {}
    if peer:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            peer = False
        else:
            t = {name: torch.from_numpy(a) for name, a in arrays.items()}
            tmask = torch.from_numpy(visible)
            theirs = {"attention": lambda: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=tmask),
                      "q projection": lambda: F.linear(t["x"], t["w"]),
                      "fc1 + GELU": lambda: F.gelu(F.linear(t["x"], t["fc1"], t["b1"])),
                      "fc2": lambda: F.linear(t["h"], t["fc2"])}
    print(f"one layer's kernels, float32, {n} positions, {heads} heads of {head_dim}: s (GFLOP/s)")
    for name, flops, run in ops:
        mine = median_seconds(run, 3)
        line = f"  {name:13s} ours {mine:.3f} ({flops / mine / 1e9:.0f})"
        if peer:
            other = median_seconds(theirs[name], 3)
            line += f"   PyTorch {other:.3f} ({flops / other / 1e9:.0f})   ours {other / mine:.2f}x its speed"
        print(line)


def transformers_seconds(vision, px) -> float | None:
    """Seconds transformers' MllamaVisionModel takes for the same encoder (its own random weights)
    and image, or None when it is not installed."""
    try:
        import torch
        from transformers import MllamaVisionConfig, MllamaVisionModel
    except ImportError:
        return None
    kept = list(vision.intermediate_layers) or [0]  # transformers needs one (keeping it costs nothing)
    config = MllamaVisionConfig(
        hidden_size=vision.dim, num_hidden_layers=vision.n_layers, num_global_layers=vision.n_global_layers,
        attention_heads=vision.n_heads, intermediate_size=vision.ffn_dim, image_size=vision.image_size,
        patch_size=vision.patch_size, max_num_tiles=vision.max_tiles, num_channels=vision.channels,
        intermediate_layers_indices=kept, vision_output_dim=vision.dim * (1 + len(kept)),
        norm_eps=vision.norm_eps)
    model = MllamaVisionModel(config).float().eval()
    pixels = torch.from_numpy(np.ascontiguousarray(px.values, dtype=np.float32))[None, None]  # [batch, images, tiles, ...]
    mask = torch.zeros(1, 1, vision.max_tiles, dtype=torch.long)
    mask[0, 0, :px.tiles] = 1
    with torch.no_grad():
        start = time.perf_counter()
        model(pixel_values=pixels, aspect_ratio_ids=torch.tensor([[px.aspect_ratio_id]]), aspect_ratio_mask=mask)
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
