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
"""
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinytensor.state import files

FORMAT = "tinytensor-kld-base-1"
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
    context (and on `tokens`, when given)."""
    path = Path(path)
    try:
        with np.load(files.regular(path), allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != FORMAT:
                raise BaseFileError(f"{path}: not a --kl-divergence-base file of this version; make one with "
                                    f"--kl-divergence-base")
            saved, saved_context = data["tokens"], int(data["context"])
            base = Base(data["log_probs"], data["nll"], data["top"])
    except (KeyError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, BaseFileError):
            raise
        raise BaseFileError(f"{path}: not a --kl-divergence-base file ({e}); make one with "
                            f"--kl-divergence-base") from None
    if saved_context != context:
        raise BaseFileError(f"{path}: made with --context {saved_context}, not {context}; use the same context")
    if tokens is not None and not np.array_equal(saved, tokens):
        raise BaseFileError(f"{path}: made on other tokens (another text or tokenizer): give the base's text")
    n = len(base.log_probs)
    if base.log_probs.ndim != 2 or base.log_probs.dtype != np.float16 or saved.ndim != 1 or \
            base.nll.shape != (n,) or base.top.shape != (n,):
        raise BaseFileError(f"{path}: its arrays are not what --kl-divergence-base writes")
    return saved, base


@dataclass
class Base:
    """The base run's scored rows: log-probabilities (float16 [rows, vocab]), NLLs and top tokens."""
    log_probs: np.ndarray
    nll: np.ndarray
    top: np.ndarray

    def __len__(self):
        return len(self.log_probs)

    def rows(self, start: int, stop: int) -> "Base":
        return Base(self.log_probs[start:stop], self.nll[start:stop], self.top[start:stop])


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
        logp -= np.logaddexp.reduce(logp, axis=-1, keepdims=True)  # renormalised after float16
        rows = np.arange(len(targets))
        p_base = np.exp(logp)
        kld = np.sum(p_base * (logp - log_probs), axis=-1)
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
