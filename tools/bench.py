"""Generation speed: prefill and decode tokens per second on each backend, beside llama.cpp's
llama-bench on the same GGUF file and threads (when it is built, see tools/llamacpp.py) and Hugging
Face transformers (PyTorch CPU, float32) on the same architecture when it is installed, with the
ratios to llama.cpp. Medians; the peers run in the same run, since these machines are shared and
noisy.

    python -m tools.bench                                  # SmolLM2-135M (the default model)
    python -m tools.bench --size 1b --random-init          # the true Llama 3.2 1B shape
    python -m tools.bench --checkpoint PATH --backends llvm
    python -m tools.bench --lookup 8                       # speculative decoding: prompt lookup
    python -m tools.bench --checkpoint BIG --draft SMALL   # ... or a draft model (tools/bench_speculative.py)
"""
import argparse
import statistics
import time

import numpy as np

import backends
from backends.llvm.threads import count as thread_count
from models.llama3 import load
from tinytensor import Tensor
from tinytensor.jit import jit
from tools import llamacpp


def bench_backend(model, prompt: list[int], decode: int, repeat: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s), medians over `repeat` prefills and all decode steps."""
    length = len(prompt) + decode + 1
    prefill_times, step_times = [], []
    for r in range(repeat + 1):  # the first round compiles and warms up
        cache = model.new_cache(length)
        start = time.perf_counter()
        model.forward(Tensor(np.array(prompt)), 0, cache, rows=slice(-1, None)).numpy()
        if r:
            prefill_times.append(time.perf_counter() - start)
    step = jit(lambda token, pos: model.forward(token, pos, cache))
    for pos in range(len(prompt), len(prompt) + decode):
        start = time.perf_counter()
        step(Tensor(np.array([7])), Tensor([pos])).numpy()
        if pos > len(prompt) + 1:  # past capture and the first replay
            step_times.append(time.perf_counter() - start)
    return len(prompt) / statistics.median(prefill_times), 1 / statistics.median(step_times)


def bench_transformers(model, prompt: list[int], decode: int, repeat: int):
    """The same architecture in transformers (float32, its own random weights: speed does not
    depend on the values), or None when it is not installed."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        tie_word_embeddings=c.tied_embeddings, max_position_embeddings=c.max_context)).float().eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prefill = []
        for _ in range(repeat + 1):
            start = time.perf_counter()
            out = hf(ids, use_cache=True)
            prefill.append(time.perf_counter() - start)
        past, steps = out.past_key_values, []
        for _ in range(decode):
            start = time.perf_counter()
            out = hf(torch.tensor([[7]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(time.perf_counter() - start)
    return len(prompt) / statistics.median(prefill[1:]), 1 / statistics.median(steps[2:])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", help="a published size (1b, 3b, ...): its weights on disk, or with --random-init")
    p.add_argument("--checkpoint", help="a checkpoint folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--random-init", action="store_true", help="random weights in --size's exact shape")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights to this dtype")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for prefill (default: 64)")
    p.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed (default: 16)")
    p.add_argument("--repeat", type=int, default=3, help="prefills timed, after one warm-up (default: 3)")
    p.add_argument("--backends", default="llvm,numpy", help="backends to time, comma-separated (default: llvm,numpy)")
    p.add_argument("--no-peer", action="store_true", help="skip the peers (llama.cpp, transformers)")
    p.add_argument("--lookup", type=int, metavar="N", help="time speculative decoding with prompt lookup, N drafts a pass, "
                                                         "beside plain decoding, on tasks that copy their input")
    p.add_argument("--draft", metavar="CHECKPOINT", help="the same with this draft model")
    p.add_argument("--draft-max", type=int, default=8, metavar="N", help="drafts a pass for --draft (default: 8)")
    p.add_argument("--reply-tokens", type=int, default=128, help="reply length for --lookup/--draft (default: 128)")
    args = p.parse_args(argv)
    if args.lookup or args.draft:
        return speculation(args)
    model = load(args.checkpoint or args.size, random_init=args.random_init, dtype=args.dtype,
                 context=args.prompt_tokens + args.decode_tokens + 1)
    prompt = list(np.random.default_rng(0).integers(0, model.config.vocab_size, args.prompt_tokens))
    name = model.config.name
    print(f"{name}: {args.prompt_tokens}-token prompt, {args.decode_tokens} decode steps, medians\n")
    print(f"{'engine':<28} {'prefill tok/s':>14} {'decode tok/s':>13}")
    ours = {}
    for backend in args.backends.split(","):
        backends.use(backend)
        ours[backend] = bench_backend(model, prompt, args.decode_tokens, args.repeat)
        print(f"{'tinytensor ' + backend:<28} {ours[backend][0]:>14.1f} {ours[backend][1]:>13.2f}")
    if args.no_peer:
        return
    gguf = peer_file(args)
    cpp = gguf and llamacpp.bench(gguf, thread_count(), args.prompt_tokens, args.decode_tokens, max(args.repeat, 3))
    if cpp:
        print(f"{'llama.cpp (llama-bench)':<28} {cpp[0]:>14.1f} {cpp[1]:>13.2f}")
        for backend, (pre, dec) in ours.items():
            print(f"{'  ratio ' + backend + ' / llama.cpp':<28} {pre / cpp[0]:>14.2f} {dec / cpp[1]:>13.2f}")
    peer = bench_transformers(model, prompt, args.decode_tokens, args.repeat)
    if peer:
        print(f"{'transformers f32 (PyTorch)':<28} {peer[0]:>14.1f} {peer[1]:>13.2f}")


def speculation(args) -> None:
    from models.generation import speculative
    from tools.bench_speculative import bench
    model = load(args.checkpoint or args.size, random_init=args.random_init, dtype=args.dtype, context=2048)
    if args.draft:
        draft = load(args.draft, context=2048)
        proposer, most, how = speculative.DraftModel(draft), args.draft_max, f"draft {draft.config.name}"
    else:
        proposer, most, how = speculative.PromptLookup(), args.lookup, "prompt lookup"
    print(f"{model.config.name}, {how}, up to {most} drafts a pass, greedy, medians of {args.repeat} rounds\n")
    bench(model, proposer, most, args.reply_tokens, args.repeat)


def peer_file(args) -> str | None:
    """The GGUF file llama.cpp runs beside us: the checkpoint when it is one (as stored: no
    --dtype), or SmolLM2's, the default model."""
    if args.dtype or args.random_init:
        return None
    if args.checkpoint:
        return args.checkpoint if args.checkpoint.endswith(".gguf") else None
    if args.size:
        return None
    from models.formats.assets import fetch
    return str(fetch("smollm2-135m"))


if __name__ == "__main__":
    main()
