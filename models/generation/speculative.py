"""Speculative decoding: a cheap guess at the next few tokens (a draft), checked by the model in
one pass over all of them, so that each weight is read once for several tokens when the guess
is right.

    the model's pass over [the last token, d1 .. dk]  ->  logits after each of them
    token 1 is drawn from the first row; if it is d1, token 2 from the second row; ... the first
    token that differs from its draft ends the step (it is the next pass's first row)

Every token is drawn by the sampler from the model's logits after exactly the tokens before it,
in the same order as without a draft: the drafts only decide how many rows one pass computes.
A token's logits are the same bits in a pass of one row or of many (the kernels' one float
order per row, docs/architecture.md), so greedy output is identical to decoding without a draft,
bit for bit, and so is sampled output with the same seed: the sampler sees the same logits and
draws the same random numbers. (For a deterministic draft, drawing from the model and keeping
the draft while they agree is the standard acceptance rule: the distribution is the model's.)

Drafts come from a proposer:
- PromptLookup: the tokens that followed the last earlier occurrence of the context's final
  n-gram (no second model): text that copies its input (editing, summarising, code) drafts well.
- DraftModel: a smaller model sharing the tokenizer (Llama 3.2 1B for 3.1 8B), greedy, drafting
  while it is confident.
"""
import numpy as np

from models.generation.scoring import log_softmax
from models.generation.sequence_cache import CachedSequence


class PromptLookup:
    """Drafts from the context itself: find the context's last `ngram` tokens earlier in it
    (the most recent occurrence, trying shorter n-grams down to `shortest` when longer ones do
    not occur), and propose what followed."""

    def __init__(self, ngram: int = 3, shortest: int = 1):
        if not 1 <= shortest <= ngram:
            raise ValueError(f"n-gram sizes {shortest}..{ngram}: give 1 <= shortest <= ngram")
        self.ngram, self.shortest = ngram, shortest

    def propose(self, history: list[int], most: int) -> list[int]:
        seq = np.asarray(history, dtype=np.int64)
        for n in range(min(self.ngram, len(seq) - 1), self.shortest - 1, -1):
            tail = seq[-n:]
            # windows starting at 0 .. len-n-1 (not the tail itself), compared whole
            starts = np.flatnonzero(seq[:len(seq) - n] == tail[0])
            for start in starts[::-1]:  # the most recent first
                if np.array_equal(seq[start:start + n], tail):
                    return seq[start + n:start + n + most].tolist()
        return []


class DraftModel:
    """A second, smaller model's greedy guess, drafting while its likeliest token has at least
    `confidence` probability (a guess it doubts is likely wasted rows in the model's pass). Its
    own cache grows with the conversation (up to its context) and keeps what it has computed."""

    def __init__(self, model, confidence: float = 0.5):
        self.model, self.confidence, self.sequence = model, confidence, None

    def propose(self, history: list[int], most: int) -> list[int]:
        most = min(most, self.model.context - len(history))
        if most <= 0:
            return []
        if self.sequence is None or self.sequence.length < len(history) + most:
            self.sequence = CachedSequence(self.model, min(max(2 * (len(history) + most), 1024), self.model.context))
        logits = self.sequence.run(history, len(history) - 1)[-1]  # only what its cache lacks
        drafts = []
        while True:
            logp = log_softmax(logits)
            token = int(np.argmax(logp))
            if np.exp(logp[token]) < self.confidence:
                break
            drafts.append(token)
            if len(drafts) == most:
                break
            logits = self.sequence.advance(token)
        return drafts


def fitting(drafts: list[int]) -> list[int]:
    """The drafts cut to fill a pass of 2, 4, 8 ... rows with the token before them, as the cache
    pads passes (CachedSequence.padded): a draft cut costs nothing, a padding row its work."""
    return drafts[:(1 << (len(drafts) + 1).bit_length() - 1) - 1]


def check_same_vocabulary(model, draft, name: str) -> None:
    """ValueError unless the draft's tokens are the model's, id for id."""
    theirs, ours = draft.tokenizer, model.tokenizer
    differs = next((i for i in range(max(theirs.vocab_size, ours.vocab_size))
                    if i >= min(theirs.vocab_size, ours.vocab_size) or theirs.token_bytes(i) != ours.token_bytes(i)), None)
    if differs is not None:
        raise ValueError(f"{name}: its vocabulary differs from the model's (from token {differs} on): a draft must "
                         f"share the model's tokenizer")


class Stats:
    """What speculation did: passes of the model, tokens drafted, drafts accepted."""

    def __init__(self):
        self.passes = self.drafted = self.accepted = 0

    def __repr__(self):
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return f"{self.drafted} drafted, {self.accepted} accepted ({rate:.0%}), {self.passes} passes"


def generate(sequence: CachedSequence, ids: list[int], max_tokens: int, sampler, stop_ids=(), proposer=None,
             most: int = 8, stats: Stats | None = None, on_prefill=None):
    """Yield new token ids after ids as CachedSequence.generate does, the same ones, with up to
    `most` drafted tokens checked per pass of the model."""
    stats = stats if stats is not None else Stats()
    rows = sequence.run(ids, len(ids) - 1)[-1:]
    if on_prefill:
        on_prefill()
    history, drafts, made = list(ids), [], 0
    while True:
        # rows[j]: the logits after history (j = 0) and after each accepted draft before it
        for j, logits in enumerate(rows):
            token = sampler(logits, history)
            if token in stop_ids:
                return
            yield token
            made += 1
            history.append(token)
            if made >= max_tokens or len(history) > sequence.length:  # the cache is full (as generate ends)
                return
            if j == len(drafts) or token != drafts[j]:
                break  # a correction, or the token after every draft: not in the cache yet
            stats.accepted += 1
        sequence.tokens = history[:-1]  # what the cache holds truly; drafts after a correction are not
        room = min(most, max_tokens - made - 1, sequence.length - len(history))  # a pass gives drafts + 1
        drafts = fitting(proposer.propose(history, room)) if room > 0 else []
        stats.drafted += len(drafts)
        stats.passes += 1
        if drafts:
            rows = sequence.run(history + drafts, len(history) - 1)
        else:
            rows = sequence.advance(history[-1])[None]
