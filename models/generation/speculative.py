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

How many drafts a pass checks is chosen per pass (Pace): the count that maximises the expected
tokens per second, from the acceptance rate seen so far and the measured cost of each pass size
(a pass of 8 rows costs ~1.3x one row on a model that is memory-bound, ~3.6x on SmolLM2 on two
cores): drafts that are seldom kept stop being checked, so speculation costs little where it
does not help.

Drafts come from a proposer:
- PromptLookup: the tokens that followed the last earlier occurrence of the context's final
  n-gram (no second model): text that copies its input (editing, summarising, code) drafts well.
- DraftModel: a smaller model sharing the tokenizer (Llama 3.2 1B for 3.1 8B), greedy, drafting
  while it is confident.
- Prediction: the reply its sender expects (OpenAI's predicted outputs), followed in place.
"""
import time

import numpy as np

from models.generation.scoring import log_softmax
from models.generation.sequence_cache import CachedSequence, common_prefix


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


class Prediction:
    """Drafts from the reply its sender expects (OpenAI's predicted output): the expected tokens
    after the place the reply has reached in them. The place follows the reply token by token;
    where the reply departs from the prediction it is found again by the reply's last n-gram
    (longest first; the first occurrence after the old place, else the first anywhere).
    propose takes the reply so far (not the prompt)."""

    def __init__(self, tokens: list[int], ngram: int = 3):
        self.tokens, self.ngram = list(tokens), ngram
        self.at, self.seen = 0, 0   # the place in tokens; how much of the reply it has followed

    def propose(self, reply: list[int], most: int) -> list[int]:
        for token in reply[self.seen:]:
            follows = self.at is not None and self.at < len(self.tokens) and self.tokens[self.at] == token
            self.at = self.at + 1 if follows else None
        self.seen = len(reply)
        if self.at is None:
            self.at = self._found(reply)
        return [] if self.at is None else self.tokens[self.at:self.at + most]

    def _found(self, reply: list[int]) -> int | None:
        for n in range(min(self.ngram, len(reply)), 0, -1):
            tail = reply[-n:]
            places = [i + n for i in range(len(self.tokens) - n + 1) if self.tokens[i:i + n] == tail]
            if places:
                return places[0]
        return None


class DraftModel:
    """A second, smaller model's greedy guess, drafting while its likeliest token has at least
    `confidence` probability (a guess it doubts is likely wasted rows in the model's pass). Its
    cache spans its context and keeps what it has computed; it catches up on the tokens since
    its last call in passes of 1 to 32 rows, each size captured once, at its first call."""

    def __init__(self, model, confidence: float = 0.5):
        self.model, self.confidence, self.sequence = model, confidence, None

    def propose(self, history: list[int], most: int) -> list[int]:
        most = min(most, self.model.context - len(history))
        if most <= 0:
            return []
        if self.sequence is None:
            self.sequence = self._warmed()
        logits = self.caught_up(history)
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

    def caught_up(self, history: list[int]) -> np.ndarray:
        """The logits after history, computing what its cache lacks in passes of at most 32
        tokens: the pass sizes captured already (CachedSequence.padded), where one pass of any
        length would capture a new size (~0.2 s for SmolLM2)."""
        start = min(common_prefix(self.sequence.tokens, history), len(history) - 1)
        for end in range(start + CachedSequence.BUCKET, len(history), CachedSequence.BUCKET):
            self.sequence.run(history[:end], end - 1)
        return self.sequence.run(history, len(history) - 1)[-1]

    def _warmed(self) -> CachedSequence:
        sequence = CachedSequence(self.model, self.model.context)
        size = 1
        while size <= CachedSequence.BUCKET:  # every pass size a catch-up takes, and the one-token step
            sequence.tokens = []
            sequence.run([0] * size, size - 1)
            size *= 2
        sequence.advance(0)
        sequence.tokens = []
        return sequence


def fitting(drafts: list[int]) -> list[int]:
    """The drafts cut to fill a pass of 2, 4, 8 ... rows with the token before them, as the cache
    pads passes (CachedSequence.padded): a draft cut costs nothing, a padding row its work."""
    return drafts[:(1 << (len(drafts) + 1).bit_length() - 1) - 1]


def check_same_vocabulary(model, draft, name: str) -> None:
    """ValueError unless the draft's tokens are the model's, id for id."""
    theirs, ours = draft.tokenizer, model.tokenizer
    shared = min(theirs.vocab_size, ours.vocab_size)
    differs = next((i for i in range(shared) if theirs.token_bytes(i) != ours.token_bytes(i)),
                   None if theirs.vocab_size == ours.vocab_size else shared)
    if differs is not None:
        raise ValueError(f"{name}: its vocabulary differs from the model's (from token {differs} on): a draft must "
                         f"share the model's tokenizer")


class Pace:
    """How many drafts the next pass should check: of 0, 1, 3, 7, 15 (passes of 1, 2, 4, 8, 16
    rows), the count that maximises expected tokens per second. Expected tokens of k drafts with
    each kept with probability a: 1 + a + ... + a^k. Seconds: the median of a pass size's recent
    times (a size not timed yet: the largest smaller one's, and 30% more a row beyond it, between
    memory- and compute-bound), and the proposer's time a call and a draft; a proposer that often
    gives nothing (a draft model in doubt) is worth asking only if asking is cheap. The acceptance
    rate is counted with decay, so it follows the text; passes without drafts let it drift back
    toward even. Now
    and then a pass of one row (the yardstick) or of the next size up is timed again; while
    drafts do not pay, one is tried after 32 passes, then 64, ... up to 1,024 (a try costs a draft
    model its catching up)."""
    COUNTS = (0, 1, 3, 7, 15)
    DECAY = 0.9
    KEPT_TIMES = 8   # a size's recent times, whose median is its cost
    REFRESH = 32     # every this many passes, time one row again, or the next size up
    LONGEST_WAIT = 1024  # passes between tries of a draft, at most, while drafts do not pay

    def __init__(self, most: int, adaptive: bool = True, kept: float = 0.0):
        """adaptive False: always as many as room allows, up to most (tests that need drafts).
        kept: drafts counted as kept before any is judged (0: the rate starts at even; 3: at
        0.8, for drafts given by the user, who expects them kept)."""
        self.most, self.adaptive = most, adaptive
        self.kept, self.refused = kept, 0.0   # decayed counts of drafts kept and refused
        self.times: dict[int, list[float]] = {}  # rows -> a pass's recent seconds
        self.calls, self.call_times, self.draft_times = 0, [], []  # the proposer's seconds a call, and a draft more
        self.gives = 1.0                    # how often the proposer gives drafts when asked (a moving average)
        self.seen: dict = {}                # (sequence, rows) -> passes seen: the first two capture and warm up
        self.passes = 0
        self.idle, self.wait = 0, self.REFRESH  # passes without drafts since the last try; passes until the next

    def rate(self) -> float:
        return (self.kept + 1) / (self.kept + self.refused + 2)

    def cost(self, rows: int) -> float:
        if rows in self.times:
            return float(np.median(self.times[rows]))
        below = max(r for r in self.times if r < rows)
        return self.cost(below) * (1 + 0.3 * (rows - below) / below)

    def count(self, room: int) -> int:
        """Drafts to ask for, at most room."""
        allowed = [k for k in self.COUNTS if k <= min(self.most, room)]
        if not self.adaptive:
            return min(self.most, room)
        self.passes += 1
        if 1 not in self.times or self.passes % self.REFRESH == 0:
            return 0  # a pass of one row, the yardstick
        a = self.rate()
        per_draft, g, one = self.draft_seconds(), self.gives, self.cost(1)
        value = {0: 1 / one}
        for k in allowed[1:]:  # asked for k: drafts with probability g, else a pass of one row
            tokens = g * (1 - a ** (k + 1)) / (1 - a) + (1 - g)
            value[k] = tokens / (g * (self.cost(k + 1) + k * per_draft) + (1 - g) * one + self.call_seconds())
        best = max(value, key=value.get)
        if best == 0:  # drafts do not pay: try one now and then, less often each time it still does not
            self.idle += 1
            if self.idle < self.wait or len(allowed) == 1:
                return 0
            self.idle, self.wait = 0, min(2 * self.wait, self.LONGEST_WAIT)
            return allowed[1]
        self.wait = self.REFRESH
        if self.passes % self.REFRESH == self.REFRESH // 2 and best != allowed[-1]:
            return allowed[allowed.index(best) + 1]  # time the next size up again: costs change
        return best

    def proposed(self, asked: int, drafts: int, seconds: float) -> None:
        """A proposer asked for `asked` drafts gave `drafts` in `seconds`: how often it gives any,
        its time a call (a draft model catches up on the tokens since its last call, drafts or
        not) and its time a draft (medians of recent calls; the first call warms up, uncounted)."""
        if not asked:
            return
        self.calls += 1
        self.gives = 0.8 * self.gives + 0.2 * (drafts > 0)
        if self.calls == 1:
            return
        if drafts:
            per_draft = max(seconds - self.call_seconds(), 0.0) / drafts
            self.draft_times = (self.draft_times + [per_draft])[-self.KEPT_TIMES:]
        else:
            self.call_times = (self.call_times + [seconds])[-self.KEPT_TIMES:]

    def call_seconds(self) -> float:
        return float(np.median(self.call_times)) if self.call_times else 0.0

    def draft_seconds(self) -> float:
        return float(np.median(self.draft_times)) if self.draft_times else 0.0

    def judged(self, drafts: int, kept: int) -> None:
        """A pass's drafts, of which the first `kept` were drawn: the next one (if any) was not."""
        if drafts:
            self.kept = self.DECAY * self.kept + kept
            self.refused = self.DECAY * self.refused + (kept < drafts)
        else:
            self.kept, self.refused = self.kept * 0.98, self.refused * 0.98

    def passed(self, sequence, rows: int, seconds: float) -> None:
        key = (id(sequence), rows)
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] > 2:
            self.times[rows] = (self.times.get(rows, []) + [seconds])[-self.KEPT_TIMES:]


class Stats:
    """What speculation did: passes of the model, tokens drafted, drafts accepted."""

    def __init__(self):
        self.passes = self.drafted = self.accepted = 0

    def __repr__(self):
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return f"{self.drafted} drafted, {self.accepted} accepted ({rate:.0%}), {self.passes} passes"


def generate(sequence: CachedSequence, ids: list[int], max_tokens: int, sampler, stop_ids=(), proposer=None,
             most: int = 8, stats: Stats | None = None, on_prefill=None, pace: Pace | None = None):
    """Yield new token ids after ids as CachedSequence.generate does, the same ones, with up to
    `most` drafted tokens checked per pass of the model (as many as `pace` asks for)."""
    stats, pace = stats if stats is not None else Stats(), pace or Pace(most)
    rows = sequence.run(ids, len(ids) - 1)[-1:]
    if on_prefill:
        on_prefill()
    history, drafts, made = list(ids), [], 0
    while True:
        # rows[j]: the logits after history (j = 0) and after each accepted draft before it
        kept = 0
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
            kept += 1
        stats.accepted += kept
        pace.judged(len(drafts), kept)
        sequence.tokens = history[:-1]  # what the cache holds truly; drafts after a correction are not
        room = min(max_tokens - made - 1, sequence.length - len(history))
        drafts, rows = step(sequence, history, proposer, pace, room)
        stats.drafted += len(drafts)
        stats.passes += 1


def step(sequence: CachedSequence, history: list[int], proposer, pace: Pace, room: int, context=None):
    """(drafts, rows): the pass after history, whose last token the cache lacks, over the drafts
    the pace asks for (at most room; proposed from context, else history): rows[j] are the
    logits after history and its first j drafts."""
    start = time.perf_counter()
    wanted = pace.count(room) if room > 0 else 0
    drafts = fitting(proposer.propose(history if context is None else context, wanted)) if wanted else []
    proposed = time.perf_counter()
    pace.proposed(wanted, len(drafts), proposed - start)
    if drafts:
        rows = sequence.run(history + drafts, len(history) - 1)
    else:
        rows = sequence.advance(history[-1])[None]
    pace.passed(sequence, len(drafts) + 1, time.perf_counter() - proposed)
    return drafts, rows
