"""The continuous-batching engine (models/generation/engine.py) and the prefix-reusing sequence cache
(models/generation/sequence_cache.py) on the real SmolLM2, driven turn by turn on the test's thread."""
import numpy as np
import pytest

from models.generation.engine import Busy, Engine, Request
from models.generation.sampling import make_sampler
from models.generation.sequence_cache import CachedSequence
from models.llama3 import load
from tinytensor import Tensor

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time there was a",
           "def fibonacci(n):\n    ", "The quick brown fox jumps over the lazy dog. The quick brown"]


@pytest.fixture(scope="module")
def model(smollm2_path):
    return load(smollm2_path, context=256)


def greedy():
    return make_sampler(temperature=0)


def alone(model, ids, n):
    return list(model.generate(ids, n, greedy()))


class Recorder:
    """A request's events, as the server would hear them."""

    def __init__(self):
        self.tokens, self.prompt, self.done = [], [], None

    def __call__(self, kind, payload):
        if kind == "token":
            self.tokens.append(payload)
        elif kind == "prompt":
            self.prompt += payload
        else:
            assert self.done is None, "done told twice"
            self.done = payload


def submit(engine, ids, n, **kw):
    heard = Recorder()
    request = Request(list(ids), n, kw.pop("sampler", greedy()), heard, **kw)
    engine.submit(request)
    return request, heard


def run_until_done(engine, heard, limit=2000):
    for _ in range(limit):
        if all(h.done for h in heard):
            return
        engine.turn()
    raise AssertionError("the engine did not finish")


@pytest.mark.parametrize("chunk", [256, 4])
def test_a_batch_gives_each_sequence_the_tokens_it_gets_alone(model, chunk):
    """Five prompts of different lengths through three slots: they join at different steps (two
    wait for a slot), decode at different positions, and each gets its greedy tokens alone,
    with whole prompts in a pass and with prompts prefilled 4 tokens a turn, interleaved with
    the others' decoding. Q4_1 as stored: its 8-bit activations turn any difference of summation
    order into other tokens, and the kernels give a row the same bits in any batch."""
    encoded = [model.tokenizer.encode(p) for p in PROMPTS]
    want = [alone(model, ids, 12) for ids in encoded]
    engine = Engine(model, parallel=3)
    engine.CHUNK = chunk
    heard = []
    for i, ids in enumerate(encoded):
        heard.append(submit(engine, ids, 12)[1])
        engine.turn()  # the next one arrives after a step, not with the first
    run_until_done(engine, heard)
    assert [[t.id for t in h.tokens] for h in heard] == want
    assert all(h.done == "length" for h in heard)
    assert engine.busy_slots() == 0 and not engine.waiting
    assert max(engine.steps) == 3  # steps did batch three sequences


def test_prompts_that_arrive_together_share_a_pass_and_keep_their_bits(model, monkeypatch):
    """Four prompts sent at once go through the model in one pass (Llama.forward_chunks), an
    echo request beside them in its own: each gets the tokens and log-probabilities it gets
    alone, to the bit; again with all but their last token cached, which then are rows of a
    decode step, and with prompts prefilled 8 tokens a turn, in several passes together.
    (SmolLM2's layers are too small for the pass to pay: the test lowers the bound.)"""
    from models.generation.scoring import log_softmax

    def alone_with_logprobs(ids):
        rows = []
        tokens = list(model.generate(ids, 6, lambda logits, h: rows.append(logits) or greedy()(logits, h)))
        return [(t, float(log_softmax(row)[t])) for t, row in zip(tokens, rows)]

    passes = []  # the chunk lengths of each pass of several prompts
    forward_chunks = model.forward_chunks
    monkeypatch.setattr(model, "forward_chunks", lambda *a: passes.append(a[4]) or forward_chunks(*a))
    encoded = [model.tokenizer.encode(p) for p in PROMPTS]
    for chunk in (256, 8):
        engine = Engine(model, parallel=5)
        engine.CHUNK, engine.TOGETHER_BYTES = chunk, 0
        for round_ in range(2):  # the second: each slot holds its prompt already, but for the last token
            prompts = encoded[:4] if round_ == 0 else [ids + [28] for ids in encoded[:4]]
            passes.clear()
            heard = [submit(engine, ids, 6, logprobs=0)[1] for ids in prompts]
            echo = submit(engine, encoded[4], 6, logprobs=0, echo=True)[1]
            run_until_done(engine, heard + [echo])
            got = [[(t.id, t.logprob) for t in h.tokens] for h in heard + [echo]]
            assert got == [alone_with_logprobs(ids) for ids in prompts + [encoded[4]]]
            if round_ == 1:  # their last tokens: rows of a step, no pass
                assert passes == [] and max(engine.steps) == 5
            elif chunk == 256:  # one pass of the four (the echo apart)
                assert passes == [tuple(len(ids) for ids in prompts)]
            else:
                assert max(map(len, passes)) >= 2
        assert engine.counts["prompt_tokens_cached"] >= sum(map(len, encoded[:4]))


def test_stop_ids_end_a_sequence_and_free_its_slot(model):
    ids = model.tokenizer.encode("1, 2, 3, 4,")
    first = alone(model, ids, 3)
    engine = Engine(model, parallel=1)
    _, heard = submit(engine, ids, 10, stop_ids=frozenset({first[2]}))
    run_until_done(engine, [heard])
    assert [t.id for t in heard.tokens] == first[:2] and heard.done == "stop"
    assert engine.busy_slots() == 0


def test_the_context_ends_generation(smollm2_path):
    small = load(smollm2_path, context=12)
    ids = small.tokenizer.encode("Once upon a time")
    engine = Engine(small, parallel=1)
    _, heard = submit(engine, ids, 100)
    run_until_done(engine, [heard])
    # positions len(ids) .. 11 take fed tokens; the last sampled token needs no position
    assert len(heard.tokens) == 12 - len(ids) + 1 and heard.done == "length"
    assert [t.id for t in heard.tokens] == alone(small, ids, 100)


def test_a_shared_prefix_is_not_computed_again(model):
    """The next turn of a chat: the slot whose cache starts like the prompt takes it and
    computes only the rest, and the tokens are those of a fresh run."""
    tok = model.tokenizer
    first = tok.encode("A conversation. User: hello there. Assistant:")
    engine = Engine(model, parallel=2)
    _, heard = submit(engine, first, 6)
    run_until_done(engine, [heard])
    slot = next(s for s in engine.slots if s.sequence.tokens)
    before = slot.sequence.computed
    second = first + [t.id for t in heard.tokens] + tok.encode(" User: and then?")
    _, heard2 = submit(engine, second, 6)
    run_until_done(engine, [heard2])
    assert [t.id for t in heard2.tokens] == alone(model, second, 6)
    computed = slot.sequence.computed - before
    assert computed <= len(second) - len(first) + 6  # the new turn's tokens and its own decode steps


def test_the_queue_is_bounded_and_cancelled_requests_leave_at_the_next_turn(model):
    engine = Engine(model, parallel=1, queue=1)
    running, heard = submit(engine, model.tokenizer.encode("Once upon a time"), 100)
    engine.turn()  # it takes the slot
    waiting, heard_waiting = submit(engine, model.tokenizer.encode("Hello"), 100)
    with pytest.raises(Busy):  # one waits already
        submit(engine, [1], 5)
    running.cancel()
    waiting.cancel()
    engine.turn()
    assert heard.done == "cancelled" and heard_waiting.done == "cancelled"
    assert engine.busy_slots() == 0 and not engine.waiting


def test_logprobs_and_echo_are_the_models(model):
    """A token's log-probability is log_softmax of the logits alone gives; an echo's prompt
    log-probabilities are those of one pass over the prompt (position 0 has none), to the bit
    (the prompt goes in chunks of 5 here)."""
    from models.generation.scoring import log_softmax
    ids = model.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    engine = Engine(model, parallel=2)
    engine.CHUNK = 5
    _, heard = submit(engine, ids, 2, logprobs=3, echo=True)
    run_until_done(engine, [heard])
    logp = log_softmax(model.logits(ids))
    assert heard.prompt[0] == (None, [])
    got = np.array([lp for lp, _ in heard.prompt[1:]])
    want = logp[np.arange(len(ids) - 1), ids[1:]]
    assert np.array_equal(got, want)
    first = heard.tokens[0]
    assert first.id == int(np.argmax(logp[-1])) and [i for i, _ in first.top] == list(np.argsort(-logp[-1])[:3])
    assert first.logprob == logp[-1, first.id]
    for _, top in heard.prompt[1:]:
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]


def test_a_seeded_sampler_gives_the_same_tokens_batched(model):
    ids = model.tokenizer.encode("Once upon a time")
    engine = Engine(model, parallel=2)
    heard = [submit(engine, ids, 10, sampler=make_sampler(temperature=1.0, seed=7))[1] for _ in range(2)]
    run_until_done(engine, heard)
    assert [t.id for t in heard[0].tokens] == [t.id for t in heard[1].tokens]
    assert [t.id for t in heard[0].tokens] == list(model.generate(ids, 10, make_sampler(temperature=1.0, seed=7)))


def test_cached_sequence_reuses_and_recomputes_from_where_prompts_differ(model):
    seq = CachedSequence(model, 64)
    a = model.tokenizer.encode("The capital of France is Paris")
    b = model.tokenizer.encode("The capital of France is Lyon")
    seq.run(a, len(a) - 1)
    computed = seq.computed
    got = seq.run(b, len(b) - 1)[-1]
    fresh = model.forward(Tensor(b), 0, model.new_cache(64)).numpy()[-1]
    assert np.array_equal(got, fresh)
    assert seq.computed - computed == len(b) - next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def test_a_sequence_alone_speculates_and_gets_the_same_tokens(model):
    """With prompt lookup, or with a prediction of its reply, a request decoding alone checks
    several drafts a pass (fewer turns than tokens) and gets the tokens it gets without; beside
    others it decodes in the batch, the same tokens again."""
    from models.generation.speculative import Pace, Prediction, PromptLookup
    tok = model.tokenizer
    text = "the quick brown fox jumps over the lazy dog and the quick brown fox jumps over the lazy dog"
    ids = tok.encode(f"Repeat: {text}. Again: {text}. Again:", bos=False)
    want = alone(model, ids, 24)
    for engine, prediction in ((Engine(model, parallel=2, proposer=PromptLookup()), []),
                               (Engine(model, parallel=2), tok.encode(tok.decode(want), bos=False))):
        # every pass checks what it can: how many a pace checks depends on this host's pass costs
        engine.pace, engine.prediction_pace = Pace(8, adaptive=False), Pace(8, adaptive=False)
        request, heard = submit(engine, ids, 24, prediction=Prediction(prediction) if prediction else None)
        turns = 0
        while heard.done is None:
            engine.turn()
            turns += 1
        assert [t.id for t in heard.tokens] == want
        assert request.accepted > 0 and request.drafted >= request.accepted and turns < len(want) - 4
        assert engine.counts["draft_tokens_accepted"] == request.accepted
        together = [submit(engine, ids, 24, prediction=Prediction(prediction) if prediction else None),
                    submit(engine, tok.encode(PROMPTS[0]), 8)]
        run_until_done(engine, [h for _, h in together])
        assert [t.id for t in together[0][1].tokens] == want
        assert [t.id for t in together[1][1].tokens] == alone(model, tok.encode(PROMPTS[0]), 8)


def test_a_warmed_engine_captures_no_step_while_serving(model):
    """warm() captures every batch width's step (idle rows only): requests joining afterwards
    wait for no capture, and get the tokens they get alone."""
    engine = Engine(model, parallel=3)
    engine.warm()
    steps = dict(engine.steps)
    assert sorted(steps) == [1, 2, 3]
    asked = [submit(engine, model.tokenizer.encode(p), 6) for p in PROMPTS[:3]]
    run_until_done(engine, [h for _, h in asked])
    assert engine.steps == steps
    for (request, heard), prompt in zip(asked, PROMPTS):
        assert [t.id for t in heard.tokens] == alone(model, model.tokenizer.encode(prompt), 6)
