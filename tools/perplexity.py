"""Perplexity of a model on a text file, computed as llama.cpp's `llama-perplexity` computes it,
so that the two figures compare on the same file:

    python -m tools.perplexity --checkpoint model.gguf --file wiki.test.raw [--context 512]

The text is tokenized once (with a BOS where the model adds one) and cut into non-overlapping
chunks of --context tokens; each chunk is one prefill whose first token is replaced by the BOS
(where the model adds one). Only the second half of each chunk is scored: the negative
log-likelihood of each token given everything before it in the chunk. Running estimates print
per chunk; the last line is `Final estimate: PPL = P +/- E`, E the standard error of the mean
NLL times P, as llama.cpp states it.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from models.generation.scoring import log_softmax


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row of logits, in float64."""
    return log_softmax(logits)[np.arange(len(targets)), targets]


def chunk_nlls(model, tokens: list[int], context: int, add_bos: bool, chunks: int | None = None):
    """Yield, chunk by chunk, the NLLs of its scored tokens (the second half, as llama.cpp)."""
    n_chunks = len(tokens) // context if chunks is None else min(chunks, len(tokens) // context)
    first = context // 2
    for i in range(n_chunks):
        chunk = list(tokens[i * context:(i + 1) * context])
        if add_bos:
            chunk[0] = model.tokenizer.bos_id
        logits = model.logits(chunk)                               # [context, vocab]
        targets = np.array(tokens[i * context + first + 1:(i + 1) * context])
        yield -log_softmax_at(logits[first:context - 1], targets)


def perplexity(model, text: str, context: int = 512, chunks: int | None = None, progress=None):
    """(perplexity, its standard error) over text, as llama-perplexity computes them."""
    add_bos = bool(getattr(model.tokenizer, "add_bos", True))  # Meta's Llama 3 tokenizer always adds one
    tokens = model.tokenizer.encode(text, bos=add_bos)
    if len(tokens) < 2 * context:
        raise ValueError(f"the text tokenizes to {len(tokens)} tokens; at least {2 * context} (twice --context) "
                         f"are needed")
    total, total_sq, count = 0.0, 0.0, 0
    for k, nll in enumerate(chunk_nlls(model, tokens, context, add_bos, chunks), 1):
        total, total_sq, count = total + nll.sum(), total_sq + (nll ** 2).sum(), count + nll.size
        if progress:
            progress(k, math.exp(total / count))
    mean = total / count
    variance = total_sq / count - mean * mean
    ppl = math.exp(mean)
    return ppl, (math.sqrt(variance / (count - 1)) * ppl if variance > 0 else float("nan"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--file", type=Path, required=True, help="the text to score (UTF-8)")
    p.add_argument("--context", type=int, default=512, help="tokens per chunk (default: 512, as llama-perplexity)")
    p.add_argument("--chunks", type=int, help="score only the first N chunks (default: all)")
    args = p.parse_args(argv)
    from models.llama3 import load
    from tinytensor.errors import UserError
    try:
        if args.context < 4:
            raise ValueError(f"--context {args.context} is too small: give at least 4 tokens")
        if args.chunks is not None and args.chunks < 1:
            raise ValueError(f"--chunks {args.chunks}: give at least 1")
        try:
            text = args.file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        model = load(args.checkpoint, context=args.context)
        start = time.perf_counter()

        def progress(k, running):
            print(f"[{k}]{running:.4f},", end="", file=sys.stderr, flush=True)
        ppl, error = perplexity(model, text, args.context, args.chunks, progress)
        print(f"\n[{time.perf_counter() - start:.1f} s]", file=sys.stderr)
    except (UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Final estimate: PPL = {ppl:.4f} +/- {error:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
