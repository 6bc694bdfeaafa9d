"""Choosing the next token from logits. The order follows Hugging Face's generate: repetition
penalty, temperature, then top-k, top-p and min-p filters, then a draw."""
import numpy as np


def make_sampler(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=None):
    """A function (logits, history of ids) -> next id. temperature 0 is greedy."""
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray, history: list[int]) -> int:
        logits = logits.astype(np.float64)
        if repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history))
            past = logits[seen]
            logits[seen] = np.where(past > 0, past / repetition_penalty, past * repetition_penalty)
        if temperature == 0:
            return int(np.argmax(logits))
        logits = logits / temperature
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
