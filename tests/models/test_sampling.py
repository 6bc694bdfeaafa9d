"""Samplers: each filter keeps exactly the tokens it should."""
import numpy as np
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from models.generation.sampling import make_sampler

logit_arrays = hnp.arrays(np.float32, st.integers(2, 50), elements=st.floats(-10, 10, width=32))


@given(logits=logit_arrays)
def test_temperature_zero_is_argmax(logits):
    assert make_sampler(temperature=0)(logits, []) == int(np.argmax(logits))


@given(logits=logit_arrays, k=st.integers(1, 5), seed=st.integers(0, 100))
def test_top_k_only_draws_from_the_k_largest(logits, k, seed):
    token = make_sampler(temperature=1.0, top_k=k, seed=seed)(logits, [])
    assert logits[token] >= np.sort(logits)[-min(k, logits.size)]


@given(logits=logit_arrays, p=st.floats(0.05, 0.95), seed=st.integers(0, 100))
def test_top_p_draws_from_the_smallest_set_reaching_p(logits, p, seed):
    probs = np.exp(logits - logits.max()).astype(np.float64)
    probs /= probs.sum()
    token = make_sampler(temperature=1.0, top_k=0, top_p=p, seed=seed)(logits, [])
    mass_above = probs[probs > probs[token]].sum()
    assert mass_above < p + 1e-9  # the chosen token is inside the nucleus


@given(logits=logit_arrays, min_p=st.floats(0.01, 0.9), seed=st.integers(0, 100))
def test_min_p_drops_tokens_below_a_fraction_of_the_best(logits, min_p, seed):
    probs = np.exp(logits.astype(np.float64) - logits.max())
    token = make_sampler(temperature=1.0, top_k=0, min_p=min_p, seed=seed)(logits, [])
    assert probs[token] >= min_p * probs.max() - 1e-12


def test_repetition_penalty_steers_away_from_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0], np.float32)
    assert make_sampler(temperature=0, repetition_penalty=1.5)(logits, [0]) == 1


def test_same_seed_same_tokens():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    first, again = make_sampler(1.0, seed=5), make_sampler(1.0, seed=5)
    assert [first(logits, []) for _ in range(20)] == [again(logits, []) for _ in range(20)]


def test_extreme_settings_never_make_nan():
    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32) * 5
    for settings in ({"temperature": 1e-320}, {"repetition_penalty": 1e-308}, {"repetition_penalty": 1e308}):
        sample = make_sampler(**settings, seed=1)
        assert 0 <= sample(logits, [1, 2, 3, int(np.argmax(logits))]) < 100


@given(logits=logit_arrays, data=st.data())
def test_logit_bias_adds_to_the_logits_and_minus_100_bans(logits, data):
    """OpenAI's logit_bias: the bias is added before the choice (greedy: the argmax of the sum);
    -100 removes the token whatever its logit; +100 makes a token the choice over logits spread
    less than 100."""
    n = logits.size
    bias = data.draw(st.dictionaries(st.integers(0, n - 1), st.floats(-99, 99), max_size=4))
    biased = logits.astype(np.float64).copy()
    for token, value in bias.items():
        biased[token] += value
    assert make_sampler(temperature=0, logit_bias=bias)(logits, []) == int(np.argmax(biased))
    best = int(np.argmax(logits))
    assert make_sampler(temperature=0, logit_bias={best: -100})(logits, []) != best
    forced = data.draw(st.integers(0, n - 1))
    for seed in range(3):
        assert make_sampler(temperature=1.0, top_k=0, logit_bias={forced: 100}, seed=seed)(logits, []) == forced


def test_presence_and_frequency_penalties_count_the_samplers_own_choices():
    """presence_penalty is subtracted once from a token chosen before, frequency_penalty once per
    time it was chosen; tokens only in the prompt (the history) are not counted."""
    logits = np.array([3.0, 2.5, 1.0], np.float32)
    sample = make_sampler(temperature=0, presence_penalty=0.4)
    assert sample(logits, [0, 0, 0]) == 0          # prompt tokens do not count: 3 > 2.5
    assert sample(logits, [0, 0, 0, 0]) == 0       # 3 - 0.4 > 2.5
    sample = make_sampler(temperature=0, presence_penalty=0.6)
    assert [sample(logits, []) for _ in range(2)] == [0, 1]   # 3 - 0.6 < 2.5
    sample = make_sampler(temperature=0, frequency_penalty=0.3)
    # 0 chosen twice: 3 - 0.6 = 2.4 < 2.5, then 1 once: 2.5 - 0.3 = 2.2 < 2.4
    assert [sample(logits, []) for _ in range(4)] == [0, 0, 1, 0]
    sample = make_sampler(temperature=0, presence_penalty=-2.0)  # negative: stay on chosen tokens
    assert [sample(np.array([2.0, 2.1], np.float32), []) for _ in range(3)] == [1, 1, 1]


def test_bad_logit_bias_and_penalties_are_refused():
    import pytest
    for bad in ({"x": 1}, {-1: 1}, {3: 101}, {3: True}, {3: "1"}):
        with pytest.raises(ValueError, match="logit_bias"):
            make_sampler(logit_bias=bad)
    for name, value in (("presence_penalty", 2.5), ("frequency_penalty", -3)):
        with pytest.raises(ValueError, match=name):
            make_sampler(**{name: value})
