"""Perplexity of a model on a text file, computed as llama.cpp's `llama-perplexity` computes it,
so that the two figures compare on the same file:

    python -m tools.perplexity --checkpoint model.gguf --file wiki.test.raw [--context 512]

The text is tokenized once (with a BOS where the model adds one) and cut into non-overlapping
chunks of --context tokens; each chunk is one prefill whose first token is replaced by the BOS
(where the model adds one). Only the second half of each chunk is scored: the negative
log-likelihood of each token given everything before it in the chunk. Running estimates print
per chunk; the last line is `Final estimate: PPL = P +/- E`, E the standard error of the mean
NLL times P, as llama.cpp states it.

To choose a quantisation, compare its token distributions with the exact model's, as
`llama-perplexity --kl-divergence` does (tools/kl_divergence.py says what is printed):

    python -m tools.perplexity --checkpoint exact/ --file text.txt --kl-divergence-base base.kld
    python -m tools.perplexity --checkpoint model-q4_0.gguf --kl-divergence-base base.kld --kl-divergence
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from models.generation.scoring import log_softmax
from tools.kl_divergence import Statistics, load_base, save_base


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row of logits, in float64."""
    return log_softmax(logits)[np.arange(len(targets)), targets]


def chunk_log_probs(model, tokens: list[int], context: int, add_bos: bool, chunks: int | None = None):
    """Yield, chunk by chunk, the log-probabilities (float64 [rows, vocab]) at its scored
    positions (the second half, as llama.cpp) and the tokens that came next."""
    n_chunks = len(tokens) // context if chunks is None else min(chunks, len(tokens) // context)
    first = context // 2
    for i in range(n_chunks):
        chunk = list(tokens[i * context:(i + 1) * context])
        if add_bos:
            chunk[0] = model.tokenizer.bos_id
        logits = model.logits(chunk)                               # [context, vocab]
        yield log_softmax(logits[first:context - 1]), np.array(tokens[i * context + first + 1:(i + 1) * context])


def chunk_nlls(model, tokens: list[int], context: int, add_bos: bool, chunks: int | None = None):
    """Yield, chunk by chunk, the NLLs of its scored tokens."""
    for log_probs, targets in chunk_log_probs(model, tokens, context, add_bos, chunks):
        yield -log_probs[np.arange(len(targets)), targets]


def adds_bos(model) -> bool:
    """Whether chunks start with a BOS (Meta's Llama 3 tokenizer always adds one)."""
    return bool(getattr(model.tokenizer, "add_bos", True))


def text_tokens(model, text: str, context: int) -> list[int]:
    """The text's tokens as perplexity scores them."""
    tokens = model.tokenizer.encode(text, bos=adds_bos(model))
    if len(tokens) < 2 * context:
        raise ValueError(f"the text tokenizes to {len(tokens)} tokens; at least {2 * context} (twice --context) "
                         f"are needed")
    return tokens


def perplexity(model, text: str, context: int = 512, chunks: int | None = None, progress=None):
    """(perplexity, its standard error) over text, as llama-perplexity computes them."""
    return token_perplexity(model, text_tokens(model, text, context), context, chunks, progress)


def token_perplexity(model, tokens: list[int], context: int, chunks: int | None = None, progress=None, keep=None):
    """perplexity's figures over tokens; `keep`, a list, receives each chunk's scored
    log-probabilities and next tokens (a KL-divergence base)."""
    total, total_sq, count = 0.0, 0.0, 0
    for k, (log_probs, targets) in enumerate(chunk_log_probs(model, tokens, context, adds_bos(model), chunks), 1):
        nll = -log_probs[np.arange(len(targets)), targets]
        total, total_sq, count = total + nll.sum(), total_sq + (nll ** 2).sum(), count + nll.size
        if keep is not None:
            keep.append((log_probs, targets))
        if progress:
            progress(k, math.exp(total / count))
    mean = total / count
    variance = total_sq / count - mean * mean
    ppl = math.exp(mean)
    return ppl, (math.sqrt(variance / (count - 1)) * ppl if variance > 0 else float("nan"))


def kl_divergence(model, base: Path, context: int, text: str | None = None, chunks: int | None = None,
                  progress=None) -> Statistics:
    """The model's statistics against a base file made on the same tokens (from `text` when
    given, checked against the base's; else the base's own)."""
    tokens = text_tokens(model, text, context) if text is not None else None
    base_tokens, rows = load_base(base, tokens, context)
    tokens = base_tokens if tokens is None else tokens
    parts, row, total = [], 0, 0.0
    for k, (ours, targets) in enumerate(chunk_log_probs(model, tokens, context, adds_bos(model), chunks), 1):
        if row + len(targets) > len(rows):
            raise ValueError(f"{base}: holds {len(rows)} scored tokens, fewer than this run scores")
        parts.append(Statistics.of(ours, rows.rows(row, row + len(targets)), targets))
        row, total = row + len(targets), total + parts[-1].nll.sum()
        if progress:
            progress(k, math.exp(total / row))
    return Statistics.joined(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--file", type=Path, help="the text to score (UTF-8); with --kl-divergence, the base's tokens "
                                             "if omitted")
    p.add_argument("--context", type=int, default=512, help="tokens per chunk (default: 512, as llama-perplexity)")
    p.add_argument("--chunks", type=int, help="score only the first N chunks (default: all)")
    p.add_argument("--kl-divergence-base", type=Path, metavar="FILE",
                   help="save every scored token's log-probabilities to FILE (a new file), or with "
                        "--kl-divergence read them from it")
    p.add_argument("--kl-divergence", action="store_true",
                   help="compare this model's distributions with --kl-divergence-base's: KL divergence, "
                        "Δp, same top token")
    args = p.parse_args(argv)
    from models.llama3 import load
    from tinytensor.errors import UserError
    try:
        if args.context < 4:
            raise ValueError(f"--context {args.context} is too small: give at least 4 tokens")
        if args.chunks is not None and args.chunks < 1:
            raise ValueError(f"--chunks {args.chunks}: give at least 1")
        if args.kl_divergence and args.kl_divergence_base is None:
            raise ValueError("--kl-divergence reads the base's log-probabilities: give --kl-divergence-base FILE")
        if args.file is None and not args.kl_divergence:
            raise ValueError("give the text to score: --file PATH")
        if args.kl_divergence_base is not None and not args.kl_divergence and \
                (args.kl_divergence_base.exists() or args.kl_divergence_base.is_symlink()):
            raise ValueError(f"{args.kl_divergence_base} exists; choose a new path for the base (nothing was "
                             f"overwritten), or add --kl-divergence to compare with it")
        text = None
        if args.file is not None:
            try:
                text = args.file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        model = load(args.checkpoint, context=args.context)
        start = time.perf_counter()

        def progress(k, running):
            print(f"[{k}]{running:.4f},", end="", file=sys.stderr, flush=True)
        if args.kl_divergence:
            statistics = kl_divergence(model, args.kl_divergence_base, args.context, text, args.chunks, progress)
            print(f"\n[{time.perf_counter() - start:.1f} s]", file=sys.stderr)
            print(statistics.report())
            return 0
        tokens, kept = text_tokens(model, text, args.context), [] if args.kl_divergence_base is not None else None
        ppl, error = token_perplexity(model, tokens, args.context, args.chunks, progress, kept)
        print(f"\n[{time.perf_counter() - start:.1f} s]", file=sys.stderr)
        if kept is not None:
            save_base(args.kl_divergence_base, tokens, args.context, *zip(*kept))
    except (UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Final estimate: PPL = {ppl:.4f} +/- {error:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
