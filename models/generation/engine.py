"""Continuous batching: one loop owns the model and advances every running sequence by one token
per step in one batched pass (Llama.forward_batch: each weight read once for all of them), while
new requests join between steps and finished or cancelled ones leave.

    submit -> waiting (bounded) -> a free slot: the one whose cache shares the longest prefix
    with the prompt (prompt caching) -> prefill of what the slot lacks, at most CHUNK prompt
    tokens per turn of the loop over all the slots (a long prompt delays the others' next token
    by a chunk, not by all of it), several text prompts' chunks in one pass (Llama.forward_chunks)
    -> decoding, batched with the other slots -> done: the slot keeps its tokens for the next

A request with images (Llama 3.2 Vision) has them encoded on the engine's thread when it gets a
slot, one encoder layer a turn (the other slots take their steps between layers: an 11B image
is minutes of work on a few cores), and the engine keeps the last `images_kept` encoded, by
digest, so the next turn of a conversation about a picture does not encode it again. It
decodes alone, one token a step: a batched step's rows are text sequences (their cross layers
have nothing to read).

A text sequence that decodes alone may speculate (models/generation/speculative.py): with the
engine's proposer (prompt lookup or a draft model), or with its request's prediction (OpenAI's
predicted output: drafts from it), one pass checks several drafted tokens. Beside others
it decodes one token a step in the batch, which already shares each weight read among them. The
tokens are the same either way.

A request hears of its progress through its `emit` callback, called on the engine's thread:
emit("prompt", [(logprob, top), ...]) once for echo requests (the prompt's own log-probabilities),
emit("token", Token) per generated token, and emit("done", reason) last, reason "stop" (a stop
id), "length" (max_tokens or the context), "cancelled" or "error: ..." (the engine goes on).
"""
import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from models.generation import speculative
from models.generation.scoring import log_softmax
from models.generation.sequence_cache import CachedSequence, shared_prefix
from tinytensor import Tensor
from tinytensor.jit import jit


class Busy(Exception):
    """The waiting queue is full: come back later."""


@dataclass
class Token:
    id: int
    logprob: float | None = None     # log p of this token under the model, when asked for
    top: list = field(default_factory=list)  # [(id, logprob)] of the likeliest tokens, when asked for


@dataclass
class Request:
    ids: list[int]
    max_tokens: int
    sampler: object                  # (logits, history) -> id, models.generation.sampling.make_sampler
    emit: object                     # (kind, payload) -> None, see the module's docstring
    stop_ids: frozenset = frozenset()
    logprobs: int | None = None      # None: none; k: each token's log p and the k likeliest
    echo: bool = False               # the prompt's log-probabilities too (position 0 has none)
    prediction: object = None        # the expected reply (speculative.Prediction): drafts for speculative decoding
    images: tuple = ()               # models.llama3.images.Pixels, one per <|image|> token of ids, in order
    drafted: int = 0                 # tokens drafted for it, and how many the model's draws kept
    accepted: int = 0
    cancelled: bool = False          # set from any thread; the engine frees the slot at the next turn
    generated: int = 0

    def cancel(self) -> None:
        self.cancelled = True


def _logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list]:
    logp = log_softmax(logits)
    top = np.argsort(-logp, kind="stable")[:k] if k else []
    return float(logp[token]), [(int(i), float(logp[i])) for i in top]


class Slot:
    def __init__(self, model, length: int):
        self.sequence = CachedSequence(model, length)
        self.request: Request | None = None
        self.prefilled = 0               # prompt tokens in the cache so far, while prefilling
        self.shown = False               # whether the cross layers show the request's images yet
        self.pictures: list = []         # the request's images encoded (EncodedImage), None: not yet
        self.next_token: int | None = None  # sampled, not yet in the cache, while decoding


class Engine:
    CHUNK = 256  # prompt tokens prefilled per turn, over all the slots that wait for theirs
    # Several prompts' chunks go in one pass (_prefill_together) when a layer's weights take at
    # least this many bytes: the pass is built each time, ~2 ms a layer a prompt, and saves a
    # read of the weights per prompt. 1B Q4_0 (33 MiB a layer), 16 prompts of 35 tokens: 2.6-2.8
    # s together against 4.1-4.6 apart; of 7 tokens 0.96 against 1.02. SmolLM2 Q4_1 (2 MiB): 16
    # of 7 tokens 0.91 s together against 0.16 apart, 4 of 35 0.36 against 0.20.
    TOGETHER_BYTES = 16 << 20

    def __init__(self, model, parallel: int = 4, queue: int = 64, proposer=None, most: int = 8,
                 images_kept: int = 4):
        """parallel slots of the model's context each (one more position: the scratch row that
        a batched step's idle rows write to); at most `queue` requests wait for a slot.
        proposer: speculative decoding's drafts for a sequence decoding alone, up to `most` a pass.
        images_kept: encoded images kept for requests that show them again (a vision model)."""
        self.model, self.queue_bound = model, queue
        self.image_token = getattr(model, "image_token_id", None)
        self.encoded: collections.OrderedDict = collections.OrderedDict()  # digest -> EncodedImage, oldest first
        self.encoding: dict = {}  # digest -> the generator encoding it (mllama.encoding), under way
        self.images_kept = images_kept
        self.proposer = proposer
        # how many drafts a pass checks, learnt as the engine runs; a prediction's drafts apart,
        # trusted at first (its sender expects it kept)
        self.pace, self.prediction_pace = speculative.Pace(most), speculative.Pace(most, kept=3.0)
        self.scratch = model.context
        self.layer_bytes = sum(int(np.prod(t.dtype.storage_shape(t.shape))) * np.dtype(t.dtype.storage).itemsize
                               for name, t in model.weights.items() if name.startswith("layers.0."))
        self.slots = [Slot(model, model.context + 1) for _ in range(parallel)]
        self.waiting: collections.deque[Request] = collections.deque()
        self.calls: collections.deque[tuple] = collections.deque()  # (work, Future): see call
        self.wake = threading.Condition()
        self.steps: dict[int, jit] = {}  # batch width -> the captured step over slots[:width]
        self.stopped = False
        # what the engine has done, for /metrics: prompt tokens computed and found cached,
        # tokens generated, requests ended (by reason)
        # (every key from the start: /metrics reads them meanwhile)
        self.counts: collections.Counter = collections.Counter(dict.fromkeys(
            ["prompt_tokens_computed", "prompt_tokens_cached", "generated_tokens", "draft_tokens",
             "draft_tokens_accepted", "images_encoded", "images_cached", "finished:stop", "finished:length", "finished:cancelled", "finished:error"], 0))

    # ---- from any thread ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; Busy when the queue is full. The prompt must fit the context."""
        if not 1 <= len(request.ids) <= self.model.context:
            raise ValueError(f"the prompt has {len(request.ids)} tokens but the context holds "
                             f"{self.model.context}")
        with self.wake:
            if len(self.waiting) >= self.queue_bound:
                raise Busy(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(request)
            self.wake.notify()

    def call(self, work) -> Future:
        """Run work() on the engine's thread at its next turn (the model is not shared between
        threads: an embedding's forward pass goes between decode steps); its result, or what it
        raised, comes back through the Future. Busy when `queue` of them wait already."""
        future = Future()
        with self.wake:
            if len(self.calls) >= self.queue_bound:
                raise Busy(f"{len(self.calls)} calls are waiting already")
            self.calls.append((work, future))
            self.wake.notify()
        return future

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()

    def busy_slots(self) -> int:
        return sum(s.request is not None for s in self.slots)

    def serve_forever(self) -> None:
        """The loop that owns the model (run it on one thread)."""
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.stopped or self.waiting or self.calls or self.busy_slots())
                if self.stopped:
                    return
            self.turn()

    # ---- on the engine's thread -----------------------------------------------------------------
    def turn(self) -> None:
        """One turn: drop what was cancelled, admit waiting requests to free slots, encode one
        layer of an image a slot waits for, prefill up to CHUNK prompt tokens, one batched
        decode step (after the calls waiting, see call)."""
        while self.calls:
            work, future = self.calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except Exception as e:  # noqa: BLE001: the caller gets it; the engine goes on
                    future.set_exception(e)
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot, "cancelled")
        self._admit()
        self._drop_unwanted_encodings()
        budget = self.CHUNK  # prompt tokens this turn, over the slots waiting for their prefill
        pieces = 1  # image encoder layers this turn, over the slots waiting for their images
        chunks = []  # (slot, prompt tokens it prefills this turn)
        for slot in [s for s in self.slots if s.request is not None and s.next_token is None]:
            if budget <= 0:
                break
            if not slot.shown and None in slot.pictures:
                pieces -= self._guarded(slot, lambda s: self._encode_piece(s, pieces)) or 0
                if None in slot.pictures:
                    continue
            chunks.append((slot, min(budget, len(slot.request.ids) - slot.prefilled)))
            budget -= chunks[-1][1]
        # a text prompt's last token (the rest found cached) is a row of this turn's decode step;
        # longer chunks of text prompts go in one pass when there are several and the weights
        # make it pay (see TOGETHER_BYTES); echoes (every row's logits) and images (their own
        # cross layers) have passes of their own
        text = [(s, n) for s, n in chunks if not s.request.echo and not s.request.images]
        for slot, n in text:
            if slot.prefilled == len(slot.request.ids) - 1:  # (n is 1 then, the budget allowing any)
                self._guarded(slot, self._last_token_in_step)
        waiting = [(s, n) for s, n in chunks if s.request is not None and s.next_token is None]
        together = [(s, n) for s, n in waiting if (s, n) in text] if self.layer_bytes >= self.TOGETHER_BYTES else []
        if len(together) < 2:
            together = []
        for slot, n in waiting:
            if (slot, n) not in together:
                self._guarded(slot, lambda s: self._prefill_chunk(s, n))
        if together:
            self._prefill_together(together)
        decoding = [s for s in self.slots if s.next_token is not None]
        batch = [s for s in decoding if not s.sequence.images]
        for slot in decoding:
            if slot.sequence.images:
                self._guarded(slot, self._decode_alone)
        if len(batch) == 1 and (self.proposer or batch[0].request.prediction):
            self._guarded(batch[0], self._speculative_step)
        elif batch:
            self._decode_step(batch)

    def _guarded(self, slot: Slot, work):
        try:
            return work(slot)
        except Exception as e:  # one request's failure ends that request, not the server
            self._fail(slot, e)

    def _fail(self, slot: Slot, error: Exception) -> None:
        slot.sequence.tokens, slot.sequence.images = [], None  # what the cache holds is unknown now
        self._finish(slot, f"error: {error}")

    def _admit(self) -> None:
        with self.wake:
            while self.waiting and any(s.request is None for s in self.slots):
                request = self.waiting.popleft()
                if request.cancelled:
                    request.emit("done", "cancelled")
                    continue
                # the free slot sharing the longest prefix; among equals the lowest, so the batch stays narrow
                shared, _, slot = max((self._reusable(s, request), -i, s)
                                      for i, s in enumerate(self.slots) if s.request is None)
                slot.request, slot.next_token, slot.shown = request, None, False
                slot.pictures = [None] * len(request.images) if self.image_token is not None else []
                slot.prefilled = 0 if request.echo else min(shared, len(request.ids) - 1)
                self.counts["prompt_tokens_cached"] += slot.prefilled

    def _reusable(self, slot: Slot, request: Request) -> int:
        """Positions of the slot's cache that the request's prompt can keep."""
        sequence = slot.sequence
        if sequence.images is None:
            return 0
        return shared_prefix(sequence.tokens, sequence.images, request.ids,
                             tuple(px.digest for px in request.images), self.image_token)

    def _show_images(self, slot: Slot) -> None:
        """The cross layers of the slot's cache made to see its request's images (or none),
        once a request, before its first pass."""
        if slot.shown:
            return
        r = slot.request
        if self.image_token is None:
            if r.images:
                raise ValueError("this model takes no images: it is not a Llama 3.2 Vision model")
        else:
            slot.sequence.show(r.ids, slot.pictures, tuple(px.digest for px in r.images))
            slot.pictures = []  # the cache holds them now
        slot.shown = True

    def _encode_piece(self, slot: Slot, most: int) -> int:
        """Take the slot's images that are encoded already, then, if `most` allows, encode one
        more layer of the first it lacks (the generator is the engine's, by digest: another
        slot waiting for the same picture goes on with it). How many layers it ran."""
        for j, pixels in enumerate(slot.request.images):
            if slot.pictures[j] is not None:
                continue
            kept = self.encoded.get(pixels.digest)
            if kept is not None:
                self.encoded.move_to_end(pixels.digest)
                self.counts["images_cached"] += 1
                slot.pictures[j] = kept
                continue
            if most <= 0:
                return 0
            pieces = self.encoding.setdefault(pixels.digest, self.model.encoding(pixels))
            try:
                next(pieces)
                return 1
            except StopIteration as done:
                self.counts["images_encoded"] += 1
                self.encoded[pixels.digest] = slot.pictures[j] = done.value
                while len(self.encoded) > self.images_kept:
                    self.encoded.popitem(last=False)
                return 1
            finally:
                if pieces.gi_frame is None:  # ended, or failed: a later request starts again
                    del self.encoding[pixels.digest]
        return 0

    def _drop_unwanted_encodings(self) -> None:
        """Encodings under way that no request waits for now (it was cancelled): their memory back."""
        wanted = {px.digest for s in self.slots if s.request is not None and not s.shown for px in s.request.images}
        for digest in [d for d in self.encoding if d not in wanted]:
            del self.encoding[digest]

    def _prefill_chunk(self, slot: Slot, most: int) -> int:
        """Prefill up to `most` more prompt tokens of the slot's request; how many it did."""
        r = slot.request
        self._show_images(slot)
        begin, end = slot.prefilled, min(slot.prefilled + most, len(r.ids))
        # rows begin..end-1 score tokens begin+1..end; for an echo every row, else the last only
        keep_from = begin if r.echo else end - 1
        logits = slot.sequence.run(r.ids[:end], keep_from)
        self.counts["prompt_tokens_computed"] += end - begin
        slot.prefilled = end
        if r.echo:
            scored = [_logprobs(row, r.ids[j + 1], r.logprobs or 0)
                      for j, row in zip(range(begin, min(end, len(r.ids) - 1)), logits)]
            r.emit("prompt", ([(None, [])] if begin == 0 else []) + scored)
        if end == len(r.ids):
            self._sampled(slot, logits[-1])
        return end - begin

    def _last_token_in_step(self, slot: Slot) -> None:
        """The prompt's last token as a decode row: the step writes it where a pass of it would
        and samples the first token from its logits (the same bits: a row's values do not depend
        on its batch), so that prompts found cached take one captured step, not a pass each."""
        r = slot.request
        self._show_images(slot)  # (a vision model: its cross layers see none)
        slot.sequence.tokens = list(r.ids[:-1])
        slot.sequence.computed += 1
        self.counts["prompt_tokens_computed"] += 1
        slot.prefilled, slot.next_token = len(r.ids), r.ids[-1]

    def _prefill_together(self, chunks: list[tuple[Slot, int]]) -> None:
        """The next n prompt tokens of each (slot, n) of text requests in one pass
        (Llama.forward_chunks), each weight read once for all: 16 prompts of 35 tokens of the 1B
        Q4_0 ran 2.64-2.76 s, against 4.1-4.6 one after another (8 of 32: 1.01-1.08 s against
        1.09-1.14; Emerald Rapids, 2 threads). A row's values are the bits its own pass gives
        it. The pass is built anew each time (see TOGETHER_BYTES), not captured: its layout
        changes with every prompt, and unpadded it computes no row in vain (a capture pads each
        prompt, to as much as twice)."""
        tokens, positions, starts, rows = [], [], [], []
        try:
            for slot, n in chunks:
                self._show_images(slot)  # (a vision model: its cross layers see none)
                begin = slot.prefilled
                tokens += slot.request.ids[begin:begin + n]
                positions += range(begin, begin + n)
                starts.append(begin)
                rows.append(len(tokens) - 1)
            caches, lengths = [slot.sequence.cache for slot, _ in chunks], tuple(n for _, n in chunks)
            logits = self.model.forward_chunks(*(Tensor(np.array(x, np.int64)) for x in (tokens, positions, starts)),
                                               caches, lengths, Tensor(np.array(rows, np.int64))).numpy()
        except Exception as e:
            for slot, _ in chunks:
                self._fail(slot, e)
            return
        for row, (slot, n) in zip(logits, chunks):
            r, end = slot.request, slot.prefilled + n
            slot.sequence.tokens = list(r.ids[:end])
            slot.sequence.computed += n
            self.counts["prompt_tokens_computed"] += n
            slot.prefilled = end
            if end == len(r.ids):
                self._guarded(slot, lambda s: self._sampled(s, row))

    def _decode_step(self, batch: list[Slot]) -> None:
        """One step of the slots in batch, in one captured pass over slots[:width]."""
        width = 1 + max(i for i, s in enumerate(self.slots) if s in batch)
        tokens, positions = np.zeros(width, np.int64), np.zeros(width, np.int64)
        writes = np.full(width, self.scratch, np.int64)  # idle rows: position 0, written to the scratch row
        for b, slot in enumerate(self.slots[:width]):
            if slot in batch:
                tokens[b] = slot.next_token
                positions[b] = writes[b] = len(slot.sequence.tokens)
        self._capture(width)
        try:
            start = time.perf_counter()
            logits = self.steps[width](Tensor(tokens), Tensor(positions), Tensor(writes)).numpy()
            if width == 1:  # a pass of one row: the paces' yardstick for speculating
                for pace in (self.pace, self.prediction_pace):
                    pace.passed(self.steps, 1, time.perf_counter() - start)
        except Exception as e:
            for slot in batch:
                self._fail(slot, e)
            return
        for b, slot in enumerate(self.slots[:width]):
            if slot in batch:
                slot.sequence.tokens.append(slot.next_token)
                self._guarded(slot, lambda s: self._sampled(s, logits[b]))

    def _decode_alone(self, slot: Slot) -> None:
        """One step of a sequence with images (its own captured pass: the cross layers read its images)."""
        self._sampled(slot, slot.sequence.advance(slot.next_token))

    def _capture(self, width: int) -> None:
        """The decode step over slots[:width], captured once (tinytensor.jit)."""
        if width not in self.steps:
            model, caches = self.model, [s.sequence.cache for s in self.slots[:width]]
            self.steps[width] = jit(lambda t, p, w: model.forward_batch(t, p, w, caches))

    def warm(self) -> None:
        """Capture the decode step of every batch width now (~0.2-0.5 s each), so that no request
        waits for one when a stream joins: each runs once with every row idle (writing the
        scratch row, read by no position)."""
        for width in range(1, len(self.slots) + 1):
            self._capture(width)
            idle = np.full(width, self.scratch, np.int64)
            self.steps[width](Tensor(np.zeros(width, np.int64)), Tensor(np.zeros(width, np.int64)), Tensor(idle))

    def _speculative_step(self, slot: Slot) -> None:
        """One pass of the slot's model over its pending token and the drafts after it (as many
        as the pace asks for); the request's tokens drawn from its rows in order while they agree
        with the drafts (speculative.generate's rule, emitting as _sampled does)."""
        r, sequence = slot.request, slot.sequence
        history = sequence.tokens + [slot.next_token]
        room = min(r.max_tokens - r.generated - 1, self.model.context - len(history))
        if r.prediction:  # drafts from the reply expected, at the place the reply has reached in it
            proposer, context, pace = r.prediction, history[len(r.ids):], self.prediction_pace
        else:
            proposer, context, pace = self.proposer, history, self.pace
        drafts, rows = speculative.step(sequence, history, proposer, pace, room, context)
        r.drafted += len(drafts)
        self.counts["draft_tokens"] += len(drafts)
        kept = 0
        for j, logits in enumerate(rows):
            sequence.tokens = history + drafts[:j]  # what the cache holds truly, and the sampler's history
            self._sampled(slot, logits)
            if slot.request is None or j == len(drafts) or slot.next_token != drafts[j]:
                break
            kept += 1
        r.accepted += kept
        self.counts["draft_tokens_accepted"] += kept
        pace.judged(len(drafts), kept)

    def _sampled(self, slot: Slot, logits: np.ndarray) -> None:
        """Draw the request's next token from logits and tell it, or end it."""
        r = slot.request
        token = int(r.sampler(logits, slot.sequence.tokens))  # the prompt and what followed it
        if token in r.stop_ids:
            return self._finish(slot, "stop")
        logprob, top = _logprobs(logits, token, r.logprobs) if r.logprobs is not None else (None, [])
        r.generated += 1
        self.counts["generated_tokens"] += 1
        r.emit("token", Token(token, logprob, top))
        if r.generated >= r.max_tokens or len(slot.sequence.tokens) >= self.model.context:
            return self._finish(slot, "length")
        slot.next_token = token

    def _finish(self, slot: Slot, reason: str) -> None:
        request, slot.request, slot.next_token = slot.request, None, None
        self.counts["finished:" + reason.split(":")[0]] += 1
        request.emit("done", reason)
