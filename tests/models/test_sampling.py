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
