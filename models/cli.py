"""python -m models.llama3: generate text or chat with a Llama-architecture model.

Text streams to stdout as it is made; one line of timings goes to stderr at the end. Bad
input (a missing or broken checkpoint, an unknown size, a prompt longer than the context) is
one line on stderr and exit status 2, never a traceback.
"""
import argparse
import sys
import time

from models.chat import chat_tokens, has_chat_format
from models.config import SIZES
from models.sampling import make_sampler
from models.tokenizer import StreamDecoder, TokenizerError
from tinytensor.state import CheckpointError

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv):
    p = _Parser(prog="python -m models.llama3", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), help="a published Llama 3.1/3.2 size")
    p.add_argument("--checkpoint", help="a Hugging Face or Meta checkpoint folder, or a .gguf file")
    p.add_argument("--prompt", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--system", help="a system prompt for chat models")
    p.add_argument("--chat", action="store_true", help="an interactive conversation")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template around the prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="make sampling reproducible")
    p.add_argument("--random-init", action="store_true", help="random weights in --size's exact architecture")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="cast the weights (default: as stored; float32 for quantised and random weights)")
    p.add_argument("--context", type=int, default=8192, help="positions to make room for (default 8192)")
    args = p.parse_args(argv)
    if args.random_init and not args.size:
        p.error("--random-init needs --size")
    if args.size and args.checkpoint:
        p.error("give --size or --checkpoint, not both")
    return args


def run(args) -> None:
    from models.llama3 import load

    start = time.perf_counter()
    model = load(args.checkpoint or args.size, random_init=args.random_init, dtype=args.dtype, context=args.context)
    load_s = time.perf_counter() - start
    tok = model.tokenizer
    sampler = make_sampler(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed)
    use_chat = not args.raw and not args.random_init and has_chat_format(tok)
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def reply(ids):
        stats = {"prompt": len(ids)}
        t0 = time.perf_counter()

        def prefill_done():
            stats["prefill_s"] = time.perf_counter() - t0
        decoder, n, text = StreamDecoder(tok), 0, []
        for token in model.generate(ids, args.max_tokens, sampler, tok.stop_ids, on_prefill=prefill_done):
            piece = decoder.add(token)
            text.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
            n += 1
        sys.stdout.write(decoder.flush() + "\n")
        decode_s = time.perf_counter() - t0 - stats["prefill_s"]
        print(f"[load {load_s:.1f} s | prompt {stats['prompt']} tokens, prefill "
              f"{stats['prompt'] / stats['prefill_s']:.1f} tok/s | {n} tokens, decode "
              f"{max(n - 1, 0) / decode_s if n > 1 else 0.0:.1f} tok/s]", file=sys.stderr)
        return "".join(text)

    if not args.chat:
        prompt = args.prompt or DEFAULT_PROMPT
        if use_chat:
            reply(chat_tokens(tok, messages + [{"role": "user", "content": prompt}]))
        else:
            reply(tok.encode(prompt, bos=True))
        return
    print("chat: type a message; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": reply(chat_tokens(tok, messages))})


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tools.fetch import FetchError
    try:
        run(args)
    except (CheckpointError, TokenizerError, FetchError, MemoryError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
