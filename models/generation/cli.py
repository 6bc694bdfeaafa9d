"""python -m models.llama3: generate text or chat with a Llama-architecture model.

Text streams to stdout as it is made; one line of timings goes to stderr at the end. Bad
input (a missing or broken checkpoint, an unknown size, an option out of range, a prompt longer
than the context) is one line on stderr and exit status 2, never a traceback.
"""
import argparse
import contextlib
import io
import os
import secrets
import signal
import stat
import sys
import threading
import time
from pathlib import Path

from models.generation import speculative
from models.generation.constraints import Grammar
from models.generation.sampling import DEFAULTS, RULES, check_setting, make_sampler
from models.generation.sequence_cache import CachedSequence
from models.generation.stops import StopText
from models.llama3.config import SIZES
from models.llama3.images import open_image
from models.llama3.vision_config import VISION_SIZES
from models.text.chat import chat_tokens, check_chat_format, has_chat_format
from models.text.tokenizer import StreamDecoder
from ops import dtypes
from tinytensor import distributed
from tinytensor.distributed import SINGLE
from tinytensor.errors import UserError
from tinytensor.state import files

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
# ranks that meet the same bad input reach their end seconds apart at most, even on a busy host
ALL_RANKS_END_WITHIN_S = 10
MAX_PROMPT_BYTES = 16 << 20  # a prompt from a file or stdin; the context bounds it long before
MAX_GRAMMAR_BYTES = 1 << 20  # a schema or grammar file


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def _whole(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: it must be >= {minimum}")
        return value
    return parse


def _setting(name: str):
    """A sampling setting, checked against the rule the sampler itself applies."""
    kind = int if name == "top_k" else float

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        try:
            return check_setting(name, value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: it must be {RULES[name][1]}") from None
    return parse


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give some text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes the terminal's locale could not decode
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return text


@contextlib.contextmanager
def _interrupt_ends_reply(in_chat: bool):
    """In a chat, Ctrl-C stops the reply at the next token (the conversation goes on); the
    signal is only noted, so no kernel is cut off halfway. Elsewhere it ends the program."""
    interrupted = threading.Event()
    if not in_chat:
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def parse_args(argv):
    p = OneLineParser(prog="python -m models.llama3", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=[*SIZES, *VISION_SIZES], help="a published Llama 3.1/3.2 size "
                                                                     "(11b and 90b: Llama 3.2 Vision)")
    p.add_argument("--checkpoint", help="a Hugging Face or Meta checkpoint folder, or a .gguf file "
                                        "(default: SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("--prompt", type=_text, help=f"the prompt; - reads it from stdin, as does a pipe or a file "
                                                f"given as stdin (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--stop", action="append", type=_text, default=[], metavar="TEXT",
                   help="end a reply at this text (left out of it); repeat for more, up to 16")
    p.add_argument("--system", type=_text, help="a system prompt for chat models")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image (JPEG, PNG, WebP...) the prompt is about, for Llama 3.2 Vision; repeat for more")
    p.add_argument("--chat", action="store_true", help="an interactive conversation")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template around the prompt")
    p.add_argument("--max-tokens", type=_whole(1), default=256, help="most tokens to generate (default: 256)")
    sampling = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json, else llama.cpp's)")
    sampling.add_argument("--temperature", type=_setting("temperature"),
                          help=f"0 is greedy (default: {DEFAULTS['temperature']})")
    sampling.add_argument("--top-k", type=_setting("top_k"),
                          help=f"draw from the k likeliest tokens, 0 keeps all (default: {DEFAULTS['top_k']})")
    sampling.add_argument("--top-p", type=_setting("top_p"),
                          help=f"draw from the likeliest tokens holding this much probability (default: {DEFAULTS['top_p']})")
    sampling.add_argument("--min-p", type=_setting("min_p"),
                          help=f"drop tokens less likely than this times the likeliest (default: {DEFAULTS['min_p']})")
    sampling.add_argument("--repetition-penalty", type=_setting("repetition_penalty"),
                          help=f"divide the scores of tokens already seen, 1 is none (default: {DEFAULTS['repetition_penalty']})")
    sampling.add_argument("--presence-penalty", type=_setting("presence_penalty"),
                          help="subtract from the scores of tokens already generated, -2 to 2 (default: 0)")
    sampling.add_argument("--frequency-penalty", type=_setting("frequency_penalty"),
                          help="subtract this times each token's count so far, -2 to 2 (default: 0)")
    sampling.add_argument("--seed", type=int, help="make sampling reproducible")
    shape = p.add_argument_group("the reply's shape (one of these; a reply ends only where it is complete)")
    shape.add_argument("--json-schema", metavar="JSON", help="the reply is JSON valid for this JSON Schema")
    shape.add_argument("--json-schema-file", type=Path, metavar="PATH", help="--json-schema, read from a file")
    shape.add_argument("--grammar", metavar="GBNF", help="the reply matches this grammar (llama.cpp's GBNF: root ::= ...)")
    shape.add_argument("--grammar-file", type=Path, metavar="PATH", help="--grammar, read from a file (.gbnf)")
    fast = p.add_argument_group("speculative decoding (the same tokens, fewer passes of the model when drafts agree)")
    fast.add_argument("--lookup", type=_whole(1), metavar="N",
                      help="draft up to N tokens per pass from the context itself (prompt lookup: editing, "
                           "summarising, code)")
    fast.add_argument("--draft", metavar="CHECKPOINT", help="draft with this smaller model (the same tokenizer)")
    fast.add_argument("--draft-max", type=_whole(1), default=8, metavar="N",
                      help="most tokens the draft model proposes per pass (default: 8)")
    p.add_argument("--random-init", action="store_true", help="random weights in --size's exact architecture")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", *(d.name for d in dtypes.BLOCKS)],
                   help="cast the weights, or quantise them at load to a GGUF block type such as q8_0 or q4_0 "
                        "(default: as stored; float32 for random weights)")
    p.add_argument("--context", type=_whole(1), default=8192, help="positions to make room for (default: 8192)")
    args = p.parse_args(argv)
    if args.random_init and not args.size:
        p.error("--random-init needs --size")
    if args.size and args.checkpoint:
        p.error("give --size or --checkpoint, not both")
    if args.image and args.chat:
        p.error("--image goes with --prompt, not --chat")
    if args.chat and (args.prompt or args.file):
        p.error("--prompt and --file give a single reply's prompt; --chat reads your messages as you type them")
    if args.prompt and args.file:
        p.error("give --prompt or --file, not both")
    if args.raw and args.system:
        p.error("--system needs the chat template, which --raw leaves out")
    if len(args.stop) > 16:
        p.error(f"{len(args.stop)} --stop strings: give at most 16")
    if args.lookup and args.draft:
        p.error("give --lookup or --draft, not both")
    if (args.lookup or args.draft) and distributed.launched()[1] > 1:  # each process would pace by its own clock
        p.error("--lookup and --draft run in one process: leave them out under mpirun (the processes must check "
                "the same drafts, and each times its own passes)")
    if args.image and (args.lookup or args.draft):
        p.error("--lookup and --draft speculate on text prompts; leave them out with --image")
    shapes = [f"--{name.replace('_', '-')}" for name in ("json_schema", "json_schema_file", "grammar", "grammar_file")
              if getattr(args, name) is not None]
    if len(shapes) > 1:
        p.error(f"give one of {' and '.join(shapes)}: a reply has one shape")
    return args


def read_grammar(args) -> Grammar | None:
    """The reply's grammar from --json-schema(-file) or --grammar(-file), checked before the
    model loads: a bad one is one line, at once."""
    if args.json_schema_file is not None:
        return Grammar.json_schema(files.read_text(args.json_schema_file, MAX_GRAMMAR_BYTES))
    if args.grammar_file is not None:
        return Grammar.gbnf(files.read_text(args.grammar_file, MAX_GRAMMAR_BYTES))
    if args.json_schema is not None:
        return Grammar.json_schema(args.json_schema)
    if args.grammar is not None:
        return Grammar.gbnf(args.grammar)
    return None


def draft_proposer(args, model):
    """What --lookup or --draft asks for (models.generation.speculative), or None."""
    if args.lookup:
        return speculative.PromptLookup()
    if not args.draft:
        return None
    from models.llama3 import load
    draft = load(args.draft, context=model.context)
    speculative.check_same_vocabulary(model, draft, f"--draft {args.draft}")
    return speculative.DraftModel(draft)


def read_prompt(args) -> str:
    """The prompt: --prompt, --file, stdin for `--prompt -` or when stdin is a pipe or a file that
    holds text (not a terminal, not /dev/null), else the default question."""
    if args.file is not None:
        text = files.read_text(args.file, MAX_PROMPT_BYTES)
    elif args.prompt == "-" or (args.prompt is None and _stdin_is_data()):
        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        if len(data) > MAX_PROMPT_BYTES:
            raise ValueError(f"the prompt on stdin is over {MAX_PROMPT_BYTES >> 20} MB")
        text = data.decode("utf-8", errors="replace")
        if not text.strip() and args.prompt is None:
            return DEFAULT_PROMPT  # an empty pipe asks nothing: the default, as without one
    else:
        text = args.prompt or DEFAULT_PROMPT
    if not text.strip():
        raise ValueError("the prompt is empty: give some text")
    return text


def _stdin_is_data() -> bool:
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):  # no stdin, or one without a descriptor
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def run(args, group=SINGLE) -> None:
    """group: the processes the model is split over (under mpirun): each loads its shards and
    follows the same steps; rank 0 reads the input and prints."""
    from models.formats import hf
    from models.llama3 import load

    images = [open_image(path) for path in args.image]  # a bad image fails now, not after loading
    grammar = read_grammar(args)  # as does a bad schema or grammar
    if group.size > 1 and args.seed is None:  # every rank must draw the same tokens
        args.seed = group.broadcast(secrets.randbits(63))
    start = time.perf_counter()
    model = load(args.checkpoint or args.size, random_init=args.random_init, dtype=args.dtype, context=args.context,
                 group=group)
    load_s = time.perf_counter() - start
    tok = model.tokenizer
    if args.chat:
        check_chat_format(tok)  # before the first message, not after it
    settings = {**DEFAULTS, **(hf.generation_settings(args.checkpoint) if args.checkpoint else {})}
    stop_ids = tok.stop_ids | settings.pop("stop_ids", set())
    for name in DEFAULTS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    proposer, most, stats = draft_proposer(args, model), args.lookup or args.draft_max, speculative.Stats()
    constraint = grammar.start(tok, stop_ids) if grammar else None
    sampler = make_sampler(**settings, seed=args.seed, constraint=constraint)
    use_chat = not args.raw and not args.random_init and has_chat_format(tok)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    conversation = None  # a chat's cache: each turn computes only what the previous turns did not

    def tokens(ids, prefill_done):
        nonlocal conversation
        if not args.chat:
            return model.generate(ids, args.max_tokens, sampler, stop_ids, on_prefill=prefill_done, images=images,
                                  proposer=proposer, most=most, stats=stats)
        ids = model.check_ids(ids).tolist()
        need = min(len(ids) + args.max_tokens, model.context)
        if conversation is None or conversation.length < need:  # room for a few turns more
            conversation = CachedSequence(model, min(max(2 * need, 1024), model.context))
        if proposer is not None:
            return speculative.generate(conversation, ids, args.max_tokens, sampler, stop_ids, proposer, most, stats,
                                        prefill_done)
        return conversation.generate(ids, args.max_tokens, sampler, stop_ids, on_prefill=prefill_done)

    def reply(ids, load_s=None) -> str:
        """Stream one reply; Ctrl-C stops it (in a chat, the conversation goes on)."""
        t0, prefill_s, prefilled_at, fresh = time.perf_counter(), None, None, len(ids)
        drafted, accepted = stats.drafted, stats.accepted
        if constraint is not None:  # each reply is one whole match of the grammar
            constraint.reset()
        computed = conversation.computed if conversation else 0

        def prefill_done():
            nonlocal prefill_s, prefilled_at, fresh
            prefilled_at = time.perf_counter()  # images are encoded before the prefill: not counted in it
            prefill_s = prefilled_at - t0 - (model.vision_seconds if images else 0.0)
            if args.chat:  # a turn computes only the prompt tokens the conversation's cache lacks
                fresh = conversation.computed - computed
        # text that could still become a --stop string is held back until it cannot
        decoder, cut, text, n, note, stopped = StreamDecoder(tok), StopText(args.stop), [], 0, "", False
        # split over processes, Ctrl-C ends them all: one stopping a reply alone would leave
        # the others waiting for it at the next step's collective
        with _interrupt_ends_reply(args.chat and group.size == 1) as interrupted:
            for token in tokens(ids, prefill_done):
                n += 1
                piece, stopped = cut.add(decoder.add(token))
                text.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
                if stopped:
                    break
                if interrupted.is_set():
                    note = " | stopped"
                    break
        if not stopped:  # the last bytes, and what was held back for a stop string that never came
            piece, stopped = cut.add(decoder.flush())
            text.append(piece + ("" if stopped else cut.flush()))
            sys.stdout.write(text[-1])
        sys.stdout.write("\n")
        # generation ends early without a stop token or string only when the context is full
        if not note and not stopped and n < args.max_tokens and len(ids) + n > model.context:
            note = f" | the context of {model.context} positions is full: raise --context"
        if prefill_s is not None:
            decode_s = time.perf_counter() - prefilled_at
            vision = f"{len(images)} image(s) encoded in {model.vision_seconds:.1f} s | " if images else ""
            reused = f" ({len(ids) - fresh} cached)" if args.chat else ""
            if proposer is not None:
                d, a = stats.drafted - drafted, stats.accepted - accepted
                note += f" | drafted {d}, accepted {a}" + (f" ({a / d:.0%})" if d else "")
            print(f"[{f'load {load_s:.1f} s | ' if load_s is not None else ''}{vision}prompt {len(ids)} tokens{reused}, "
                  f"prefill {fresh / prefill_s:.1f} tok/s | {n} tokens, decode "
                  f"{max(n - 1, 0) / decode_s if n > 1 else 0.0:.1f} tok/s{note}]", file=sys.stderr)
        return "".join(text)

    if not args.chat:
        prompt = group.from_rank_0(lambda: read_prompt(args))
        if images and "<|image|>" not in tok.special:
            raise ValueError("--image needs a Llama 3.2 Vision checkpoint: this tokenizer has no <|image|> token")
        if use_chat:  # the Instruct template puts the images before the text
            content = [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}] if images else prompt
            reply(chat_tokens(tok, messages + [{"role": "user", "content": content}]), load_s)
        else:
            ids = tok.encode(prompt, bos=True)
            if images:  # BOS, the images, the text
                ids = ids[:1] + [tok.special["<|image|>"]] * len(images) + ids[1:]
            reply(ids, load_s)
        return
    print(f"[load {load_s:.1f} s] chat: type a message; an empty line or Ctrl-D ends, Ctrl-C stops a reply",
          file=sys.stderr)
    if isinstance(sys.stdin, io.TextIOWrapper):  # bytes that are not UTF-8 become U+FFFD, not the end of the chat
        sys.stdin.reconfigure(errors="replace")
    while True:
        line = group.from_rank_0(_read_line)
        if not line:
            break
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": reply(chat_tokens(tok, messages))})


def _read_line() -> str:
    """The next message, or "" when the user ends the chat (an empty line, Ctrl-D or Ctrl-C)."""
    try:
        line = input("> ")
        return line if line.strip() else ""
    except (EOFError, KeyboardInterrupt):
        print()  # leave the shell on a fresh line, not after "> "
        return ""


def main(argv=None) -> int:
    rank, _ = distributed.launched()
    errors = sys.stderr
    if rank != 0:  # under mpirun the other ranks follow rank 0 silently, but for their own errors
        errors = os.fdopen(os.dup(sys.stderr.fileno()), "w")
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, sys.stdout.fileno())
        os.dup2(quiet, sys.stderr.fileno())
    args = parse_args(sys.argv[1:] if argv is None else argv)
    group = SINGLE
    try:
        group = distributed.from_environment()
        run(args, group)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UserError, ValueError, OSError, MemoryError) as e:
        return _end(rank, group, 2, f"error: {e}", errors)
    except KeyboardInterrupt:
        return _end(rank, group, 130, "", errors)
    return 0


def _end(rank: int, group, code: int, message: str, errors) -> int:
    """Say what went wrong and give the exit status. Bad input reaches every rank alike (rank 0's
    input is shared with its errors), so rank 0 says it and all exit as usual: an abort could
    end mpirun before it had passed on what rank 0 printed. A rank that ends while another does
    not (that one waits in a collective) ends them all, saying why if it is not rank 0.
    (Without a working MPI each process ends alone, and rank 0 speaks.)"""
    if rank != 0 and group.size == 1:
        return code
    if rank == 0:
        print(message, file=errors, flush=True)
    if group.end_together(within=ALL_RANKS_END_WITHIN_S):
        return code
    if rank != 0:
        print(message and f"{message} (rank {rank} of {group.size})", file=errors, flush=True)
    group.abort(code)
    return code
