"""python -m tools.server [--checkpoint PATH] [--host 127.0.0.1] [--port 8080] [--parallel N]
[--context C]: the model behind the OpenAI HTTP API (/v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/models), /health, /metrics, /tokenize, /detokenize and /tokenizer_info.

Bad options are one line on stderr and exit status 2; the model loads after the server is up
(/health answers 503 until it has), and a checkpoint that fails to load ends the server with one
line and status 2.
"""
import argparse
import os
import sys
import threading

from models.generation.cli import OneLineParser, _whole
from models.generation.pooling import POOLINGS
from ops import dtypes


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{value:g} is out of range: give seconds in (0, 86400)")
    return value


def parse_args(argv):
    p = OneLineParser(prog="python -m tools.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a Hugging Face or Meta checkpoint folder, or a .gguf file "
                                        "(default: SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", *(d.name for d in dtypes.BLOCKS)],
                   help="cast or quantise the weights at load, as python -m models.llama3 --dtype")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine "
                                                       "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_whole(0), default=8080, help="default: 8080")
    p.add_argument("--parallel", type=_whole(1), default=4, help="sequences decoded together in one step, each "
                                                                 "with its own cache (default: 4)")
    p.add_argument("--context", type=_whole(16), default=4096, help="positions per sequence (default: 4096)")
    p.add_argument("--queue", type=_whole(1), default=64, help="requests that may wait for a free sequence; "
                                                               "beyond it: 503 (default: 64)")
    p.add_argument("--api-key", default=os.environ.get("TINYTENSOR_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $TINYTENSOR_API_KEY, else none)")
    p.add_argument("--name", help="the model's name in /v1/models (default: the checkpoint's)")
    p.add_argument("--cors", metavar="ORIGIN", help="let web pages from this origin call the API (e.g. "
                                                    "http://localhost:3000, or * for any); default: none")
    p.add_argument("--no-access-log", action="store_true", help="no line per request on stderr")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="how /v1/embeddings makes one vector of an "
                                                                     "input's final hidden states: their mean, or "
                                                                     "the last token's (default: mean)")
    p.add_argument("--no-normalize", action="store_true", help="embeddings as pooled, not scaled to unit length")
    p.add_argument("--lookup", type=_whole(1), metavar="N", help="speculative decoding by prompt lookup, up to N "
                                                                "drafts a pass, for a sequence decoding alone")
    p.add_argument("--draft", metavar="CHECKPOINT", help="speculative decoding with this smaller model (the same "
                                                         "tokenizer), for a sequence decoding alone")
    p.add_argument("--draft-max", type=_whole(1), default=8, metavar="N", help="drafts a pass for --draft (default: 8)")
    p.add_argument("--image-cache", type=_whole(0), default=4, metavar="N",
                   help="encoded images kept for the next requests that show them (Llama 3.2 Vision; default: 4)")
    p.add_argument("--timeout", type=_positive, default=30.0, help="seconds a client may take to send a request's "
                                                                   "head, and again its body (beyond: the connection "
                                                                   "is closed, or 408) (default: 30)")
    args = p.parse_args(argv)
    if args.port > 65535:
        p.error(f"argument --port: {args.port} is too big: ports go up to 65535")
    if args.lookup and args.draft:
        p.error("give --lookup or --draft, not both")
    return args


def loader(args):
    """What the engine thread runs: the model and the sampling defaults of its checkpoint."""
    def load():
        from models.formats import hf
        from models.llama3 import available_memory, load
        from models.generation import speculative
        from models.generation.sampling import DEFAULTS

        model = load(args.checkpoint, dtype=args.dtype, context=args.context)
        c = model.config
        need = args.parallel * 2 * c.n_layers * c.n_kv_heads * (model.context + 1) * c.head_dim * 4
        if need > 0.9 * available_memory():
            raise MemoryError(f"{args.parallel} sequences of {model.context} positions need {need / 2**30:.1f} GiB "
                              f"of cache: lower --parallel or --context")
        generation = hf.generation_settings(args.checkpoint) if args.checkpoint else {}
        stop_ids = model.tokenizer.stop_ids | generation.pop("stop_ids", set())
        proposer, most = None, args.lookup or args.draft_max
        if args.lookup:
            proposer = speculative.PromptLookup()
        elif args.draft:
            draft = load(args.draft, dtype=args.dtype, context=args.context)
            speculative.check_same_vocabulary(model, draft, f"--draft {args.draft}")
            proposer = speculative.DraftModel(draft)
        return model, {"sampling": {**DEFAULTS, **generation}, "stop_ids": stop_ids, "proposer": proposer,
                       "most": most, "images_kept": args.image_cache}
    return load


def model_name(args) -> str:
    from pathlib import Path
    if args.name:
        return args.name
    return Path(args.checkpoint).name if args.checkpoint else "SmolLM2-135M-Instruct"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import uvicorn

    from tools.server.app import Server, make_app
    from tools.server.connections import with_header_timeout

    server = Server(loader(args), model_name(args), args.parallel, args.queue, args.api_key, args.timeout,
                    args.cors, not args.no_access_log, args.pooling, not args.no_normalize)
    config = uvicorn.Config(make_app(server), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=2, http=with_header_timeout(args.timeout))
    http = uvicorn.Server(config)

    def watch_loading():  # a model that cannot load ends the server: nothing could be served
        while not server.ready.wait(0.5):
            if server.failed:
                http.should_exit = True
                return
        print("[tools.server] ready", file=sys.stderr)
    threading.Thread(target=watch_loading, daemon=True).start()
    print(f"[tools.server] http://{args.host}:{args.port}/v1 ({model_name(args)}, {args.parallel} parallel, "
          f"context {args.context}); loading the model", file=sys.stderr)
    http.run()
    if server.failed:
        print(f"error: {server.failed}", file=sys.stderr)
        return 2
    return 0 if http.started else 1


def console() -> int:
    """`tinytensor-server`, and python -m tools.server."""
    try:
        return main()
    except KeyboardInterrupt:  # Ctrl-C before the server was up: nothing to say
        return 130


if __name__ == "__main__":
    sys.exit(console())
