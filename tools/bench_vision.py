"""Llama 3.2 Vision's image encoder at its true shape, random weights: seconds per image, beside
transformers' MllamaVisionModel (PyTorch CPU, float32) on the same encoder and image in the same
run when it is installed.

    python -m tools.bench_vision [--size 11b] [--dtype q4_0] [--layers 2] [--image photo.jpg] [--no-peer]

The encoder runs all its tiles (4 x 1608 tokens) through every layer, so its cost is the same for
any image. With --layers k it runs k local layers and k global ones (of 32 and 8), and the
per-layer times are scaled up to the whole encoder, saying so, to keep a run short. The peer has
its own random weights (speed does not depend on the values); compare float32 with float32.
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.bench_vision", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(VISION_SIZES), default="11b")
    p.add_argument("--dtype", default="q4_0", help="the encoder's matrices (default q4_0)")
    p.add_argument("--layers", type=int, default=0, help="local and global layers to run (0: all)")
    p.add_argument("--image", help="an image file (default: a random 900 x 1200 picture)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    args = p.parse_args(argv)
    full = VISION_SIZES[args.size]
    v = full.vision
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
