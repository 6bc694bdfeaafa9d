"""One sequence's key/value cache and the tokens it holds, so that the next sequence computes
only from where it departs from them: evaluation's prompts that share few-shot examples, the next
turn of a chat, a server slot's next request with the same system prompt (prompt caching).

The cache's record of what it holds is `tokens`: position i holds the keys and values of
tokens[i]. Anything written past them (a pass's padding, a batched step's idle row) is garbage
that the next write there replaces. With Llama 3.2 Vision, what a position holds depends on the
images its <|image|> tokens stand for too: `images` records their digests (see shared_prefix).
"""
import numpy as np

from tinytensor import Tensor
from tinytensor.jit import jit


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_prefix(tokens: list[int], images: tuple, ids: list[int], new_images: tuple, image_token=None) -> int:
    """How many leading positions of a cache holding `tokens`, whose k-th <|image|> token showed
    images[k] (digests), also serve the prompt `ids` with new_images: the common prefix, up to
    the first image token whose image differs. Text before an image token sees no image, so it
    is reused whatever the images. Consecutive image tokens share the span of the last of them
    (images.image_spans), so a run of them that the prefix ends with is left out where an image
    token follows it in either: their rows see that image too."""
    n = common_prefix(tokens, ids)
    if image_token is None:
        return n
    seen = 0
    for i in range(n):
        if tokens[i] == image_token:
            if seen >= min(len(images), len(new_images)) or images[seen] != new_images[seen]:
                n = i
                break
            seen += 1
    if any(n < len(seq) and seq[n] == image_token for seq in (tokens, ids)):
        while n > 0 and ids[n - 1] == image_token:
            n -= 1
    return n


class CachedSequence:
    BUCKET = 32  # a pass's length is rounded up to a power of two up to this, then to a multiple of it

    @classmethod
    def padded(cls, n: int) -> int:
        """How many rows a pass of n tokens computes: few lengths get captured (building a graph
        costs ~0.1-0.5 s), and a short pass does at most twice its work (an 8-token prompt of a
        1B model padded to 32 rows cost 375 ms instead of ~130)."""
        if n <= cls.BUCKET:
            return 1 << (n - 1).bit_length()
        return -(-n // cls.BUCKET) * cls.BUCKET

    def __init__(self, model, length: int, cache=None):
        """A fresh cache of `length` positions, or `cache` as the model made it (with images)."""
        self.model, self.cache = model, cache if cache is not None else model.new_cache(length)
        self.tokens: list[int] = []
        self.images: tuple | None = ()  # the digests of the images the cross layers see; None: unknown
        self.image_places: tuple = ()    # and the positions of their <|image|> tokens
        self.passes, self.step = {}, None
        self.computed = 0  # tokens run through the model (the work prefix reuse saves shows here)

    @property
    def length(self) -> int:
        return self.cache.length

    def run(self, ids: list[int], keep_from: int) -> np.ndarray:
        """Logits [len(ids) - keep_from, vocab] of positions keep_from.. of ids, computing only
        what the cache does not already hold (and never less than position keep_from).

        A pass is a captured step (tinytensor.jit) for its length rounded up (`padded`): building
        a 30-layer graph costs ~0.1 s, more than a short pass computes. The padding tokens go
        after the real ones, so their keys and values land in positions no real token has yet."""
        if len(ids) > self.length:
            raise ValueError(f"a sequence of {len(ids)} tokens does not fit a cache of {self.length} positions")
        start = min(common_prefix(self.tokens, ids), keep_from)
        new, wanted = ids[start:], len(ids) - keep_from
        size = self.padded(len(new))
        if start + size > self.length:
            size = len(new)
        tokens = np.zeros(size, dtype=np.int64)
        tokens[:len(new)] = new
        key = (size, wanted)
        if key not in self.passes:
            model, cache = self.model, self.cache
            self.passes[key] = jit(lambda t, at, rows: model.forward(t, at, cache, rows=rows))
        rows = np.arange(len(new) - wanted, len(new), dtype=np.int64)
        logits = self.passes[key](Tensor(tokens), Tensor([start]), Tensor(rows)).numpy()
        self.tokens = list(ids)
        self.computed += len(new)
        return logits

    def show(self, ids: list[int], images: list, digests: tuple) -> None:
        """Point a vision model's cross layers at the encoded images of the prompt ids (none: no
        image), unless they show them already where ids puts them. The captured passes read the
        old images' buffers, so they are captured anew."""
        image_token = self.model.image_token_id
        at = tuple(i for i, t in enumerate(ids) if t == image_token)
        if (digests, at) == (self.images, self.image_places):
            return
        # positions that saw other images hold what ids will not: forgotten
        kept = 0 if self.images is None else shared_prefix(self.tokens, self.images, ids, digests, image_token)
        self.tokens, self.images = self.tokens[:kept], None  # None: unknown until attach has finished
        self.model.attach(self.cache, ids, images)
        self.images, self.image_places = digests, at
        self.passes, self.step = {}, None

    def advance(self, token: int) -> np.ndarray:
        """Logits [vocab] after appending one token (a decode step, captured once)."""
        if len(self.tokens) >= self.length:
            raise ValueError(f"the cache of {self.length} positions is full")
        if self.step is None:
            model, cache = self.model, self.cache
            self.step = jit(lambda t, position: model.forward(t, position, cache))
        logits = self.step(Tensor(np.array([token], dtype=np.int64)), Tensor([len(self.tokens)])).numpy()[-1]
        self.tokens.append(token)
        self.computed += 1
        return logits

    def generate(self, ids: list[int], max_tokens: int, sampler, stop_ids=(), on_prefill=None):
        """Yield new token ids after ids: the part of the prompt the cache does not hold in one
        pass, then one token per step; sampler: (logits, history) -> id."""
        logits = self.run(ids, len(ids) - 1)[-1]
        if on_prefill:
            on_prefill()
        history = list(ids)
        for _ in range(max_tokens):
            token = sampler(logits, history)
            if token in stop_ids:
                return
            yield token
            if len(self.tokens) >= self.length:
                return
            history.append(token)
            logits = self.advance(token)
