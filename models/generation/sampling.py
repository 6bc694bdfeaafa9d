"""Choosing the next token from logits. The order follows Hugging Face's generate: repetition
penalty, temperature, then top-k, top-p and min-p filters, then a draw."""
import numpy as np


# The defaults, shared by the CLI and the API: llama.cpp's. min-p removes the long tail of
# unlikely tokens that, at temperature 0.8, otherwise makes a small model start with nonsense.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0}


RULES = {  # setting -> (what a valid value satisfies, the rule in words)
    "temperature": (lambda v: 0 <= v < float("inf"), ">= 0 (0 is greedy)"),
    "top_k": (lambda v: type(v) is int and v >= 0, "a whole number >= 0 (0 keeps all)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 keeps all)"),
    "min_p": (lambda v: 0 <= v < 1, "in [0, 1) (0 keeps all)"),
    "repetition_penalty": (lambda v: 0 < v < float("inf"), "> 0 (1 is none)"),
}


def check_setting(name: str, value):
    """ValueError unless value is in the setting's range."""
    ok, rule = RULES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} is {value!r}: it must be {rule}")
    return value


def make_sampler(temperature=DEFAULTS["temperature"], top_k=DEFAULTS["top_k"], top_p=DEFAULTS["top_p"],
                 min_p=DEFAULTS["min_p"], repetition_penalty=DEFAULTS["repetition_penalty"], seed=None):
    """A function (logits, history of ids) -> next id. temperature 0 is greedy."""
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    for name, value in settings.items():
        check_setting(name, value)
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray, history: list[int]) -> int:
        logits = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # overflows are handled: an extreme setting never makes a NaN
            if repetition_penalty != 1.0 and history:
                seen = np.unique(np.asarray(history))
                past = logits[seen]
                logits[seen] = np.where(past > 0, past / repetition_penalty, past * repetition_penalty)
            # a penalty can overflow a logit (x / 1e-308): an infinite one is the best, finite
            logits = np.nan_to_num(logits, nan=-np.inf, posinf=np.finfo(np.float64).max, neginf=-np.inf)
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

    return sample
