"""Choosing the next token from logits. The order follows Hugging Face's generate, OpenAI's
fields first: logit bias, repetition penalty, presence and frequency penalties, temperature,
then top-k, top-p and min-p filters, then a draw. A constraint (models/generation/constraints.py)
masks the tokens its grammar does not allow before any of them: greedy takes the best allowed
token, and the filters see only allowed ones."""
from collections import Counter

import numpy as np


# The defaults, shared by the CLI and the API: llama.cpp's. min-p removes the long tail of
# unlikely tokens that, at temperature 0.8, otherwise makes a small model start with nonsense.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0}
BIAS_LIMIT = 100.0  # OpenAI's logit_bias range; -100 bans a token, +100 all but forces it


RULES = {  # setting -> (what a valid value satisfies, the rule in words)
    "temperature": (lambda v: 0 <= v < float("inf"), ">= 0 (0 is greedy)"),
    "top_k": (lambda v: type(v) is int and v >= 0, "a whole number >= 0 (0 keeps all)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 keeps all)"),
    "min_p": (lambda v: 0 <= v < 1, "in [0, 1) (0 keeps all)"),
    "repetition_penalty": (lambda v: 0 < v < float("inf"), "> 0 (1 is none)"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2] (0 is none)"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2] (0 is none)"),
}


def check_setting(name: str, value):
    """ValueError unless value is in the setting's range."""
    ok, rule = RULES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} is {value!r}: it must be {rule}")
    return value


def check_logit_bias(bias: dict, vocab_size: int | None = None) -> dict[int, float]:
    """{token id: bias} with ids >= 0 (and < vocab_size when given) and biases in [-100, 100]:
    ValueError naming the first entry that is not."""
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias key {key!r} is not a token id") from None
        if token < 0 or (vocab_size is not None and token >= vocab_size) or str(token) != str(key).strip():
            raise ValueError(f"logit_bias key {key!r} is not a token id in [0, {vocab_size})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -BIAS_LIMIT <= value <= BIAS_LIMIT:
            raise ValueError(f"logit_bias[{key!r}] is {value!r}: it must be a number in [-100, 100]")
        out[token] = float(value)
    return out


def make_sampler(temperature=DEFAULTS["temperature"], top_k=DEFAULTS["top_k"], top_p=DEFAULTS["top_p"],
                 min_p=DEFAULTS["min_p"], repetition_penalty=DEFAULTS["repetition_penalty"],
                 presence_penalty=DEFAULTS["presence_penalty"], frequency_penalty=DEFAULTS["frequency_penalty"],
                 logit_bias=None, seed=None, constraint=None):
    """A function (logits, history of ids) -> next id. temperature 0 is greedy.

    As OpenAI defines them: logit_bias ({id: bias}) is added to the logits (-100 bans the token);
    presence_penalty is subtracted from the logit of every token this sampler has chosen before
    (its reply so far; a CLI chat's replies), frequency_penalty times how often it chose it. The
    repetition penalty (Hugging Face's) divides the scores of every token in the history.
    constraint: a Constraint for this one reply (a sampler with one serves one reply)."""
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    for name, value in settings.items():
        check_setting(name, value)
    bias = check_logit_bias(logit_bias or {})
    bias_ids = np.fromiter(bias, np.int64, len(bias))
    bias_values = np.array([-np.inf if v == -BIAS_LIMIT else v for v in bias.values()], np.float64)
    rng = np.random.default_rng(seed)
    chosen = Counter()

    def choose(logits: np.ndarray, history: list[int]) -> int:
        logits = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # overflows are handled: an extreme setting never makes a NaN
            if len(bias_ids):
                logits[bias_ids] += bias_values
            if repetition_penalty != 1.0 and history:
                seen = np.unique(np.asarray(history))
                past = logits[seen]
                logits[seen] = np.where(past > 0, past / repetition_penalty, past * repetition_penalty)
            if chosen and (presence_penalty or frequency_penalty):
                ids = np.fromiter(chosen, np.int64, len(chosen))
                logits[ids] -= presence_penalty + frequency_penalty * np.fromiter(chosen.values(), np.float64, len(ids))
            # a penalty can overflow a logit (x / 1e-308): an infinite one is the best, finite
            logits = np.nan_to_num(logits, nan=-np.inf, posinf=np.finfo(np.float64).max, neginf=-np.inf)
            if constraint is not None:
                constraint.mask(logits)
                if np.isneginf(logits).all():
                    raise RuntimeError("logit_bias bans every token the grammar allows here")
            if temperature == 0:
                return int(np.argmax(logits))
            logits = (logits - logits.max()) / temperature  # a tiny temperature: all but the best -inf
        if 0 < top_k < logits.size:
            kth = np.partition(logits, -top_k)[-top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]  # mass of the tokens ranked above
            probs[order[before >= top_p]] = 0.0              # keep the smallest set reaching top_p
        if min_p > 0.0:
            probs[probs < min_p * probs.max()] = 0.0
        return int(rng.choice(probs.size, p=probs / probs.sum()))

    def sample(logits: np.ndarray, history: list[int]) -> int:
        token = choose(logits, history)
        if constraint is not None:
            constraint.advance(token)
        chosen[token] += 1
        return token

    return sample
