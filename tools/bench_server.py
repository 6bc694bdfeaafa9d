"""Aggregate decode speed of tools.server with 1, 4, 8, 16 concurrent streams, and of llama.cpp's
llama-server on the same file and threads when it is built (tools/llamacpp.py): the same client,
the same requests, over loopback.

    python -m tools.bench_server [--checkpoint model.gguf] [--streams 1,4,8,16] [--tokens 64] [--repeat 3]
                                 [--prompt-words 0]

Each stream asks /v1/completions for `--tokens` tokens (greedy, ignore_eos) of its own prompt,
all at once. A stream's decode tokens are those after its first; the aggregate is their sum over
the time from the first stream's first token to the last stream's last token (its median over
--repeat rounds). The weights are read once per step for all streams, so on a bandwidth-bound
CPU 8 streams should give well over 4 times one. Beside it, the time from sending the requests
to the last stream's first token (median): with --prompt-words N each prompt has N more words
and starts with the round's number, so that no server finds it cached (by default the prompts
are a few words, the same every round).
"""
import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from backends.llvm.threads import count as thread_count
from models.generation.cli import OneLineParser, _whole
from tools import llamacpp

PROMPTS = ["Once upon a time", "The history of Rome", "In a quiet village", "The main idea of physics is",
           "Dear friend,", "Recipe for bread:", "A list of colours:", "The weather today"]


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(s) for s in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if counts[0] < 1:
        raise argparse.ArgumentTypeError("stream counts must be >= 1")
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, process, log, seconds=600) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            log.seek(0)
            sys.exit(f"error: the server ended while starting: {log.read()[-500:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit("error: the server did not come up in time")


def stream(url: str, prompt: str, tokens: int, arrivals: list) -> None:
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is None:
                    arrivals.append(time.perf_counter())  # a token (its text may wait for the next)


WORDS = "the river runs past old stone walls where children play and merchants call out their prices".split()
rounds = iter(range(1 << 30))  # numbers the rounds' long prompts: none is a prefix of another's


def aggregate(url: str, n: int, tokens: int, words: int = 0) -> tuple[float, float]:
    """(aggregate decode tok/s, seconds to the last stream's first token) of n streams at once."""
    arrivals = [[] for _ in range(n)]
    round_ = next(rounds)
    prompts = [(f"[{round_}] " if words else "") + PROMPTS[i % len(PROMPTS)] + f" ({i})" +
               "".join(" " + WORDS[(i + w) % len(WORDS)] for w in range(words)) for i in range(n)]
    threads = [threading.Thread(target=stream, args=(url, prompts[i], tokens, arrivals[i])) for i in range(n)]
    sent = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    begin, end = min(a[0] for a in arrivals), max(a[-1] for a in arrivals)
    return sum(len(a) - 1 for a in arrivals) / (end - begin), max(a[0] for a in arrivals) - sent


def measure(name: str, command: list[str], url: str, streams: list[int], tokens: int, repeat: int,
            words: int) -> dict:
    log = tempfile.TemporaryFile("w+")  # not a pipe: llama-server logs enough to fill one and stall
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        wait_up(url, process, log)
        aggregate(url, max(streams), 4, words)  # warm: every batch width captured once
        for n in range(1, max(streams) + 1):
            aggregate(url, n, 2, words)
        figures = {}
        for n in streams:
            rounds_ = [aggregate(url, n, tokens, words) for _ in range(repeat)]
            figures[n] = tuple(statistics.median(x) for x in zip(*rounds_))
            print(f"{name:>12} {n:>3} streams: {figures[n][0]:7.1f} tok/s aggregate "
                  f"({figures[n][0] / figures[streams[0]][0]:.2f}x {streams[0]} stream), "
                  f"last first token after {figures[n][1] * 1e3:.0f} ms", flush=True)
        return figures
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m tools.bench_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--streams", type=_counts, default="1,4,8,16", help="concurrent streams to measure (default: 1,4,8,16)")
    p.add_argument("--tokens", type=_whole(2), default=64, help="tokens per stream (default: 64)")
    p.add_argument("--repeat", type=_whole(1), default=3, help="rounds per figure; the median is given (default: 3)")
    p.add_argument("--context", type=_whole(16), default=512, help="positions per stream (default: 512)")
    p.add_argument("--prompt-words", type=_whole(0), default=0,
                   help="words added to each prompt, which then differs every round (default: 0)")
    args = p.parse_args(argv)
    streams = args.streams
    from models.formats.assets import fetch
    checkpoint = Path(args.checkpoint) if args.checkpoint else fetch("smollm2-135m")

    port = free_port()
    ours = measure("tinytensor", [sys.executable, "-m", "tools.server", "--checkpoint", str(checkpoint), "--port",
                                  str(port), "--parallel", str(max(streams)), "--context", str(args.context)],
                   f"http://127.0.0.1:{port}", streams, args.tokens, args.repeat, args.prompt_words)
    peer = llamacpp.find("llama-server")
    if peer is None or checkpoint.suffix != ".gguf":
        print("llama-server: not built or not a GGUF file; no peer figures (see tools/llamacpp.py)")
        return 0
    port = free_port()
    theirs = measure("llama-server", [str(peer), "-m", str(checkpoint), "-t", str(thread_count()), "--port", str(port),
                                      "-np", str(max(streams)), "-c", str(args.context * max(streams)), "-cb"],
                     f"http://127.0.0.1:{port}", streams, args.tokens, args.repeat, args.prompt_words)
    for n in streams:
        print(f"{n:>3} streams: tinytensor / llama-server = {ours[n][0] / theirs[n][0]:.2f} aggregate, "
              f"{theirs[n][1] / ours[n][1]:.2f} first tokens' speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
