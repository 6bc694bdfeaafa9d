"""Embeddings from a decoder's final hidden states (Llama.hidden_states): one vector per input,
pooled over its tokens as llama-server's --pooling pools them ("mean": their average; "last": the
last token's, the only one that has seen the whole input), then scaled to unit length unless
asked not to (OpenAI's embeddings are unit vectors, so a dot product is their cosine)."""
import numpy as np

POOLINGS = ("mean", "last")


def pool(hidden: np.ndarray, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
    """hidden [tokens, dim] -> float32 [dim], summed in float64."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: give one of {', '.join(POOLINGS)}")
    v = hidden.astype(np.float64).mean(axis=0) if pooling == "mean" else hidden[-1].astype(np.float64)
    if normalize:
        length = np.linalg.norm(v)
        v = v / length if length > 0 else v
    return v.astype(np.float32)
