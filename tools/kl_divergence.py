"""How far a model's token distributions are from a base model's on the same text, as
`llama-perplexity --kl-divergence` reports it: the base run saves its log-probabilities of every
scored token (`--kl-divergence-base FILE`), a later run of another model (a quantisation of the
same weights) reads them (`--kl-divergence`) and prints

- both perplexities and the mean of ln(PPL(Q) / PPL(base)) per token,
- the KL divergence KL(base || Q) per token: its mean with the standard error, and percentiles,
- Δp, the change in the probability of the token that came next: mean, RMS, percentiles,
- how often both models put the same token on top.

The base file is a NumPy .npz (read without pickles): the tokens scored (so a base made on
another text, tokenizer or context is refused), the context, the log-probabilities as float16
(within 2^-11 relative of each log p, at half the size of float32), and, exact, each scored
token's NLL and top token (near-uniform rows have tops closer than float16 tells apart).
A base that `llama-perplexity --kl-divergence-base` wrote is read too: with the same GGUF file
on both sides, the KL divergence is then how far our logits are from llama.cpp's.
"""
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinytensor.state import files

FORMAT = "tinytensor-kld-base-1"
LLAMACPP_MAGIC = b"_logits_"  # llama-perplexity's own base files (read_llamacpp)
PERCENTILES = [("Maximum", 100.0), ("99.9%", 99.9), ("99.0%", 99.0), ("95.0%", 95.0), ("90.0%", 90.0),
               ("Median", 50.0), ("10.0%", 10.0), ("5.0%", 5.0), ("1.0%", 1.0), ("0.1%", 0.1), ("Minimum", 0.0)]


class BaseFileError(ValueError):
    pass


def save_base(path: Path, tokens: list[int], context: int, log_probs: list[np.ndarray], targets: list[np.ndarray]):
    """Write the base run's log-probabilities (one [rows, vocab] float64 array per chunk) and the
    tokens that came next to path, a new file (never over another)."""
    rows = np.concatenate(log_probs)
    nll = -rows[np.arange(len(rows)), np.concatenate(targets)]
    with files.new_file(Path(path)) as partial, open(partial, "wb") as out:
        np.savez(out, format=np.array(FORMAT), tokens=np.asarray(tokens, np.int64), context=np.int64(context),
                 log_probs=rows.astype(np.float16), nll=nll, top=np.argmax(rows, axis=-1))


def load_base(path: Path, tokens: list[int] | None, context: int) -> tuple[np.ndarray, "Base"]:
    """The base's tokens and its scored rows, after checking that they were computed with this
    context (and on `tokens`, when given): ours, or llama-perplexity's own (read_llamacpp)."""
    path = Path(path)
    with open(files.regular(path), "rb") as f:
        magic = f.read(len(LLAMACPP_MAGIC))
    if magic == LLAMACPP_MAGIC:
        saved, saved_context, base = read_llamacpp(path)
        return _checked(path, saved, saved_context, base, tokens, context)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("format", "tokens", "context", "log_probs", "nll", "top")}
    except (KeyError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise BaseFileError(f"{path}: not a --kl-divergence-base file ({e}); make one with "
                            f"--kl-divergence-base") from None
    if str(arrays["format"]) != FORMAT:
        raise BaseFileError(f"{path}: not a --kl-divergence-base file of this version; make one with "
                            f"--kl-divergence-base")
    saved, saved_context = arrays["tokens"], int(arrays["context"])
    base = Base(arrays["log_probs"], arrays["nll"], arrays["top"])
    n = len(base.log_probs)
    if base.log_probs.ndim != 2 or base.log_probs.dtype != np.float16 or saved.ndim != 1 or \
            base.nll.shape != (n,) or base.top.shape != (n,):
        raise BaseFileError(f"{path}: its arrays are not what --kl-divergence-base writes")
    return _checked(path, saved, saved_context, base, tokens, context)


def _checked(path, saved, saved_context, base, tokens, context):
    if saved_context != context:
        raise BaseFileError(f"{path}: made with --context {saved_context}, not {context}; use the same context")
    # llama-perplexity keeps the tokens of the chunks it scored, a prefix of the text's
    if tokens is not None and (len(saved) > len(tokens) or not np.array_equal(saved, tokens[:len(saved)])):
        raise BaseFileError(f"{path}: made on other tokens (another text or tokenizer): give the base's text")
    return saved, base


def read_llamacpp(path: Path) -> tuple[np.ndarray, int, "Base"]:
    """A base written by `llama-perplexity --kl-divergence-base`: "_logits_", the context (u32),
    the vocabulary and chunk count (i32), the chunks' tokens (i32), then per scored token a row
    of uint16: a float32 scale and minimum (4 of them), then log p_i = scale * u_i + minimum for
    each token of the vocabulary (an even count), u = 0 meaning "at most the minimum" (16 below
    the top logit). The NLLs are llama.cpp's own (a target at u = 0 counts the minimum)."""
    raw = np.fromfile(path, np.uint8)
    header = 8 + 12
    if len(raw) < header:
        raise BaseFileError(f"{path}: too short for llama-perplexity's log-probabilities")
    context, vocab, chunks = (int(v) for v in (raw[8:12].view("<u4")[0], *raw[12:20].view("<i4")))
    rows, width = chunks * (context - 1 - context // 2), 2 * ((vocab + 1) // 2) + 4
    size = header + 4 * context * chunks + 2 * rows * width
    if min(context, vocab, chunks) < 1 or len(raw) != size:
        raise BaseFileError(f"{path}: {len(raw)} bytes, not the {size} its header promises (llama-perplexity's "
                            f"file, truncated or damaged?)")
    tokens = raw[header:header + 4 * context * chunks].view("<i4").astype(np.int64)
    table = raw[header + 4 * context * chunks:].view("<u2").reshape(rows, width)
    scale, minimum = (table[:, i:i + 2].copy().view("<f4")[:, 0].astype(np.float64) for i in (0, 2))
    u = table[:, 4:4 + vocab]
    first = context // 2
    targets = np.concatenate([tokens[c * context + first + 1:(c + 1) * context] for c in range(chunks)])
    log_probs = np.empty((rows, vocab), np.float16)
    for r in range(0, rows, 256):  # a few rows at a time: float32 [rows, vocab] may not fit
        part = scale[r:r + 256, None].astype(np.float32) * u[r:r + 256] + minimum[r:r + 256, None].astype(np.float32)
        # below its floor a probability is unknown (and < e^-16 of the top's): none, as
        # llama-perplexity's KL sum leaves it out
        log_probs[r:r + 256] = np.where(u[r:r + 256] > 0, part, -np.inf)
    nll = -(scale * u[np.arange(rows), targets] + minimum)
    return tokens, context, Base(log_probs, nll, np.argmax(u, axis=-1), complete=False)


@dataclass
class Base:
    """The base run's scored rows: log-probabilities (float16 [rows, vocab]), NLLs and top tokens."""
    log_probs: np.ndarray
    nll: np.ndarray
    top: np.ndarray
    complete: bool = True  # whether every row holds all its probability (else: llama.cpp's floor)

    def __len__(self):
        return len(self.log_probs)

    def rows(self, start: int, stop: int) -> "Base":
        return Base(self.log_probs[start:stop], self.nll[start:stop], self.top[start:stop], self.complete)


@dataclass
class Statistics:
    """Per scored token: the NLLs of both models, KL(base || Q), Δp and whether the top tokens agree."""
    nll: np.ndarray
    base_nll: np.ndarray
    kld: np.ndarray
    delta_p: np.ndarray
    same_top: np.ndarray

    @classmethod
    def of(cls, log_probs: np.ndarray, base: Base, targets: np.ndarray) -> "Statistics":
        """From the rows of Q's log-probabilities (float64), the base's, and the tokens that came next."""
        logp = base.log_probs.astype(np.float64)
        if base.complete:  # renormalised after float16 (llama.cpp's rows lack what fell below their floor)
            logp -= np.logaddexp.reduce(logp, axis=-1, keepdims=True)
        rows = np.arange(len(targets))
        p_base = np.exp(logp)
        kld = np.sum(np.where(p_base > 0, p_base * (logp - log_probs), 0.0), axis=-1)
        return cls(-log_probs[rows, targets], base.nll, kld, np.exp(log_probs[rows, targets]) - np.exp(-base.nll),
                   np.argmax(log_probs, -1) == base.top)

    @classmethod
    def joined(cls, parts: list["Statistics"]) -> "Statistics":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def report(self) -> str:
        n = len(self.kld)

        def mean_error(x):
            return x.mean(), x.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")

        ln_ratio, ln_error = mean_error(self.nll - self.base_nll)
        kld, kld_error = mean_error(self.kld)
        dp, dp_error = mean_error(self.delta_p)
        same = self.same_top.mean()
        rms = np.sqrt(np.mean(self.delta_p ** 2))
        lines = [f"====== Perplexity statistics ({n} tokens) ======",
                 f"Mean PPL(Q)                   : {np.exp(self.nll.mean()):10.6f}",
                 f"Mean PPL(base)                : {np.exp(self.base_nll.mean()):10.6f}",
                 f"Mean ln(PPL(Q)/PPL(base))     : {ln_ratio:10.6f} ± {ln_error:.6f}",
                 "", "====== KL divergence statistics ======",
                 f"Mean    KLD: {kld:10.6f} ± {kld_error:.6f}"]
        lines += [f"{name:<7} KLD: {np.percentile(self.kld, q):10.6f}" for name, q in PERCENTILES]
        lines += ["", "====== Token probability statistics ======",
                  f"Mean    Δp: {100 * dp:8.3f} ± {100 * dp_error:.3f} %"]
        lines += [f"{name:<7} Δp: {100 * np.percentile(self.delta_p, q):8.3f}%" for name, q in PERCENTILES]
        lines += [f"RMS Δp    : {100 * rms:8.3f} %",
                  f"Same top p: {100 * same:8.3f} ± {100 * np.sqrt(same * (1 - same) / max(n - 1, 1)):.3f} %"]
        return "\n".join(lines)
