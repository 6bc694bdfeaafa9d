"""Scoring text with a model, as evaluation needs it: the log-likelihood of a continuation given
a context, and greedy generation up to stop strings, both reusing the key/value cache of the
longest token prefix already computed.

Evaluation asks for thousands of these, and they share prefixes: every MMLU question of a subject
follows the same few-shot examples, and each of its four answers follows the same question. The
cache holds the tokens of the last pass; a new sequence recomputes only from where it departs
from them (and at least its last context token, whose logits score the first continuation
token). Answers of one token each (" A", " B", ...) are scored together from one pass.
"""
import numpy as np

from models.generation.sequence_cache import CachedSequence


def encode(tokenizer, text: str) -> list[int]:
    """Text as Hugging Face tokenizers encode it by default (what evaluation harnesses see): with
    the BOS where the model's tokenizer adds one (Meta's Llama 3 tokenizer always does)."""
    return tokenizer.encode(text, bos=bool(getattr(tokenizer, "add_bos", True)))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: spaces that end the
    context move to the continuation, the whole text is encoded and the context's own encoding
    cut from its front; an empty context is the BOS (or EOS) token alone."""
    if not context:
        ids = tokenizer.encode(continuation, bos=False)
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return ([prefix], ids) if ids[:1] != [prefix] else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = encode(tokenizer, context + continuation), encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64 (a sum over 128k entries)."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - (np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)) + top)


class Scorer:
    """Log-likelihoods and greedy continuations of token sequences for one model, one sequence
    at a time, with the cache of the previous one reused where the new one starts the same."""

    FIRST_CACHE = 512  # positions; the cache doubles (up to the model's context) when a sequence needs more

    def __init__(self, model):
        self.model, self.sequence, self.computed_before = model, None, 0

    @property
    def tokens_computed(self) -> int:
        """Tokens run through the model (the work prefix reuse saves shows here)."""
        return self.computed_before + (self.sequence.computed if self.sequence else 0)

    def _reserve(self, length: int) -> None:
        if length > self.model.context:
            raise ValueError(f"a sequence of {length} tokens does not fit the context of "
                             f"{self.model.context}: raise --context or shorten it")
        if self.sequence is None or self.sequence.length < length:
            size = self.FIRST_CACHE
            while size < length:
                size *= 2
            self.computed_before = self.tokens_computed
            self.sequence = CachedSequence(self.model, min(size, self.model.context))

    def _run(self, ids: list[int], keep_from: int) -> np.ndarray:
        self._reserve(len(ids))
        return self.sequence.run(ids, keep_from)

    def loglikelihoods(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether it is the greedy continuation) for each
        continuation. context must hold at least one token, each continuation at least one."""
        if not context or any(not c for c in continuations):
            raise ValueError("a context and each continuation need at least one token")
        if all(len(c) == 1 for c in continuations):  # one pass scores them all
            logp = log_softmax(self._run(list(context), len(context) - 1)[-1])
            best = int(np.argmax(logp))
            return [(float(logp[c[0]]), c[0] == best) for c in continuations]
        results = []
        for continuation in continuations:
            ids = list(context) + list(continuation)
            logp = log_softmax(self._run(ids[:-1], len(context) - 1))
            picked = logp[np.arange(len(continuation)), continuation]
            results.append((float(picked.sum()), bool((logp.argmax(axis=-1) == continuation).all())))
        return results

    def greedy(self, context: list[int], max_tokens: int, stop_ids=(), stop_text=(), decode=None) -> list[int]:
        """Greedy tokens after context, up to max_tokens, a stop id (not included), or a stop
        string in decode(tokens so far) (generation ends; the caller cuts the text there)."""
        self._reserve(min(len(context) + max_tokens, self.model.context))
        out = []
        for token in self.sequence.generate(list(context), max_tokens, lambda logits, _: int(np.argmax(logits)),
                                            stop_ids):
            out.append(token)
            if stop_text and any(s in decode(out) for s in stop_text):
                break
        return out
