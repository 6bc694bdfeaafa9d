"""The Python API checks its arguments where they come in: ValueError or TypeError that say
what is wrong, never a wrapped index or an internal error later."""
import json

import numpy as np
import pytest

from models.formats import checkpoint
from models.generation.sampling import make_sampler
from models.llama3 import Llama, load
from models.llama3.config import LlamaConfig
from tinytensor.state import CheckpointError
from tools import make_checkpoint

CONFIG = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=64, max_context=64)


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, checkpoint.random_weights(CONFIG), context=16)


@pytest.mark.parametrize("ids, error, words", [
    ([-1], ValueError, "outside the vocabulary"), ([50], ValueError, "outside the vocabulary"),
    ([2**63], ValueError, "outside the vocabulary"), ([1.5, 2.7], TypeError, "ints"),
    ([True], TypeError, "ints"), ([], ValueError, "empty"), ("hello", TypeError, "encode"),
    (list(range(17)), ValueError, "context"),
])
def test_logits_checks_token_ids(model, ids, error, words):
    with pytest.raises(error, match=words):
        model.logits(ids)


def test_numpy_ints_are_token_ids(model):
    assert model.logits(np.array([1, 2, 3])).shape == (3, 50)


@pytest.mark.parametrize("max_tokens, sampler, error", [
    (-1, make_sampler(temperature=0), ValueError), (0, make_sampler(temperature=0), ValueError),
    (2.5, make_sampler(temperature=0), ValueError), (3, "greedy", TypeError),
])
def test_generate_checks_its_arguments_when_called(model, max_tokens, sampler, error):
    with pytest.raises(error):
        model.generate([1, 2], max_tokens, sampler)  # raised at the call, not at the first next()


def test_generate_stops_at_the_context(model):
    out = list(model.generate([1, 2, 3], 100, make_sampler(temperature=0)))
    assert len(out) == 16 - 3 + 1  # the last token is sampled from the last position's logits


@pytest.mark.parametrize("settings", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                      dict(top_k=2.5), dict(min_p=1), dict(repetition_penalty=0),
                                      dict(temperature=float("nan"))])
def test_make_sampler_refuses_settings_out_of_range(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        make_sampler(**settings)


def test_an_unknown_size_is_named():
    with pytest.raises(ValueError, match="unknown size '7b'"):
        load("7b")


@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layers": -3}, "n_layers"), ({"num_attention_heads": 0}, "n_heads"),
    ({"num_key_value_heads": 8}, "must divide"), ({"hidden_size": "64"}, "hidden_size"),
    ({"vocab_size": None}, "vocab_size"), ({"rms_norm_eps": -1.0}, "norm_eps"),
    ({"rope_scaling": {"rope_type": "llama3"}}, "factor"), ({"rope_scaling": "big"}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
     "high_freq_factor"), ({"head_dim": 7}, "head_dim"),
])
def test_a_nonsense_config_names_the_field(tmp_path, change, words):
    folder = tmp_path / "hf"
    make_checkpoint.write_hf(folder, CONFIG, checkpoint.RandomArrays(CONFIG))
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=words) as error:
        checkpoint.load(folder)
    assert "config.json" in str(error.value)


def test_a_config_that_is_not_an_object(tmp_path):
    folder = tmp_path / "hf"
    make_checkpoint.write_hf(folder, CONFIG, checkpoint.RandomArrays(CONFIG))
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        checkpoint.load(folder)
