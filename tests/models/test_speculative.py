"""Speculative decoding (models/generation/speculative.py) gives exactly the tokens decoding
without it gives: greedy, and sampled with the same seed (the sampler sees the same logits and
draws the same numbers), whatever the drafts, with prompt lookup and with a draft model, on
SmolLM2 as stored (Q4_1)."""
import pytest

from models.generation import speculative
from models.generation.constraints import Grammar
from models.generation.sampling import make_sampler
from models.generation.sequence_cache import CachedSequence
from models.llama3 import load
from models.text.chat import chat_tokens

pytestmark = pytest.mark.slow

PARAGRAPH = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
             "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass doors "
             "of Victory Mansions, though not quickly enough to prevent a swirl of gritty dust from entering along "
             "with him.")


@pytest.fixture(scope="module")
def model(smollm2_path):
    return load(smollm2_path, context=1024)


@pytest.fixture(scope="module")
def draft(smollm2_path):
    """A draft that mostly agrees: the same model, its weights re-quantised to q8_0 at load."""
    return load(smollm2_path, dtype="q8_0", context=1024)


def copy_prompt(model):
    return chat_tokens(model.tokenizer, [{"role": "user", "content": "Repeat this text exactly:\n\n" + PARAGRAPH}])


def plain(model, ids, n, sampler):
    return list(CachedSequence(model, len(ids) + n).generate(ids, n, sampler, model.tokenizer.stop_ids))


def speculated(model, ids, n, sampler, proposer, most=8):
    """Every pass checks all the drafts it can (no pace: these tests need drafts checked)."""
    stats = speculative.Stats()
    out = list(speculative.generate(CachedSequence(model, len(ids) + n), ids, n, sampler, model.tokenizer.stop_ids,
                                    proposer, most, stats, pace=speculative.Pace(most, adaptive=False)))
    return out, stats


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    lookup = speculative.PromptLookup(ngram=3)
    #             0  1  2  3  4  5  6  7  8  9 10 11
    history = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    assert lookup.propose(history, 3) == [2, 3, 6]           # "6 7" last seen at 6..7 (no "3 6 7" before)
    assert lookup.propose([1, 2, 3, 4, 1, 2, 3], 2) == [4, 1]  # the 3-gram first
    assert lookup.propose([1, 2, 3, 4], 5) == []              # nothing repeats
    assert lookup.propose([4, 9, 4], 5) == [9, 4]             # down to one token
    assert speculative.PromptLookup(ngram=2, shortest=2).propose([4, 9, 4], 5) == []


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_the_same_tokens_greedy_and_seeded(model, draft, kind):
    ids = copy_prompt(model)
    proposer = speculative.PromptLookup() if kind == "lookup" else speculative.DraftModel(draft)
    want = plain(model, ids, 80, make_sampler(temperature=0))
    got, stats = speculated(model, ids, 80, make_sampler(temperature=0), proposer)
    assert got == want and len(want) > 40
    assert stats.accepted > len(want) // 2 and stats.passes < len(want) * 2 // 3  # the copy drafts well
    for seed in (1, 2, 3):
        want = plain(model, ids, 60, make_sampler(temperature=1.0, seed=seed))
        got, stats = speculated(model, ids, 60, make_sampler(temperature=1.0, seed=seed), proposer)
        assert got == want and stats.drafted > stats.accepted  # sampled replies reject some drafts


def test_a_prediction_drafts_from_where_the_reply_is_in_it():
    predicted = speculative.Prediction([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert predicted.propose([], 3) == [1, 2, 3]
    assert predicted.propose([1, 2], 3) == [3, 4, 5]          # followed token by token
    assert predicted.propose([1, 2, 3, 9], 3) == []           # departed: 9 is last, nothing after it
    assert predicted.propose([1, 2, 3, 9, 6, 7], 2) == [8, 9]  # found again by its last n-gram
    repeats = speculative.Prediction([5, 0, 1, 5, 0, 2, 5, 0, 3])
    assert repeats.propose([7, 5, 0], 1) == [1]               # the first place a repeated n-gram is
    assert repeats.propose([7, 5, 0, 1, 5, 0], 1) == [2]      # then followed, not searched again


def test_the_pace_drafts_where_drafts_pay():
    """Drafts always kept on a model whose passes cost little more with more rows: the most;
    drafts seldom kept: one at most; a pass of 8 rows costing 8 of one: none."""
    pace = speculative.Pace(8)
    assert pace.count(5) == 0                      # nothing measured: a pass of one row first
    for rows, seconds in ((1, 0.010), (2, 0.011), (4, 0.012), (8, 0.014)):
        pace.passed("s", rows, 1.0)                # a first pass captures, a second warms up: not counted
        pace.passed("s", rows, 0.5)
        pace.passed("s", rows, seconds)
    for _ in range(20):
        pace.judged(7, 7)
    assert [pace.count(100) for _ in range(10)].count(7) >= 9 and pace.count(3) == 3
    for _ in range(30):
        pace.judged(7, 0)
    assert sum(pace.count(100) <= 1 for _ in range(10)) >= 9  # at ~10% kept, one draft at 10% more a pass just pays
    slow = speculative.Pace(8)
    for rows in (1, 2, 4, 8):
        for seconds in (1.0, 0.5, 0.010 * rows):
            slow.passed("s", rows, seconds)
    for _ in range(20):
        slow.judged(7, 5)                          # ~80% kept, but each row costs a pass
    assert [slow.count(100) for _ in range(10)].count(0) >= 9  # (one pass may time the next size up)
    empty = speculative.Pace(8)                    # a proposer asked that gives nothing (a doubtful draft model)
    for seconds in (1.0, 0.5, 0.010):
        empty.passed("s", 1, seconds)
    for _ in range(10):
        empty.proposed(7, 0, 0.004)                # 40% of a pass to say nothing (the first call: warm-up)
        empty.judged(0, 0)
    assert [empty.count(100) for _ in range(10)].count(0) >= 9
    for _ in range(200):                           # passes without drafts: the rate drifts back up
        pace.judged(0, 0)
    assert pace.count(100) > 0


def test_max_tokens_the_context_and_a_constraint_hold(model):
    """Speculation stops where decoding stops (max_tokens, a full cache) and keeps a grammar."""
    ids = copy_prompt(model)
    for n in (1, 2, 7, 9):
        assert speculated(model, ids, n, make_sampler(temperature=0), speculative.PromptLookup())[0] == \
            plain(model, ids, n, make_sampler(temperature=0))
    sequence = CachedSequence(model, len(ids) + 20)   # the cache fills before max_tokens
    got = list(speculative.generate(sequence, ids, 100, make_sampler(temperature=0), model.tokenizer.stop_ids,
                                    speculative.PromptLookup()))
    assert got == list(CachedSequence(model, len(ids) + 20).generate(ids, 100, make_sampler(temperature=0),
                                                                      model.tokenizer.stop_ids))
    tok, stops = model.tokenizer, model.tokenizer.stop_ids
    schema = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 200}}, "required": ["text"],
              "additionalProperties": False}

    def shaped():
        return make_sampler(temperature=0, constraint=Grammar.json_schema(schema).start(tok, stops))
    want = plain(model, ids, 80, shaped())
    assert speculated(model, ids, 80, shaped(), speculative.PromptLookup())[0] == want
