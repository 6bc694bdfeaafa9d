"""Run under mpiexec by tests/models/test_tensor_parallel.py (and in-process by it, as one rank): a
prefill and greedy decode steps of a model split over the launched processes; rank 0 saves
every step's logits and the greedy tokens.

    mpiexec -n 2 python tests/tensor_parallel_worker.py OUT.npz random 'CONFIG-JSON' DTYPE
    mpiexec -n 2 python tests/tensor_parallel_worker.py OUT.npz file CHECKPOINT
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.formats import checkpoint  # noqa: E402
from models.llama3 import Llama, load  # noqa: E402
from models.llama3.config import LlamaConfig  # noqa: E402
from tinytensor import Tensor, dtypes  # noqa: E402
from tinytensor.distributed import SINGLE, from_environment  # noqa: E402
from tinytensor.jit import jit  # noqa: E402

PROMPT = [3, 17, 42, 5, 99, 8, 21]
STEPS = 4


def random_model(settings: dict, dtype: str, group=SINGLE) -> Llama:
    config = LlamaConfig(**settings)
    weights = checkpoint.random_weights(config, dtype=dtypes.to_dtype(dtype), part=(group.rank, group.size))
    return Llama(config, weights, None, context=64, group=group)


def steps(model: Llama) -> tuple[list[np.ndarray], list[int]]:
    """The prefill's logits [len(PROMPT), vocab], then each greedy decode step's [1, vocab]."""
    cache = model.new_cache(len(PROMPT) + STEPS)
    logits = [model.forward(Tensor(np.array(PROMPT)), 0, cache).numpy()]
    tokens = [int(logits[0][-1].argmax())]
    step = jit(lambda token, pos: model.forward(token, pos, cache))
    for pos in range(len(PROMPT), len(PROMPT) + STEPS):
        logits.append(step(Tensor(np.array([tokens[-1]])), Tensor([pos])).numpy())
        tokens.append(int(logits[-1][-1].argmax()))
    return logits, tokens


if __name__ == "__main__":
    out, kind = sys.argv[1], sys.argv[2]
    group = from_environment()
    model = random_model(json.loads(sys.argv[3]), sys.argv[4], group) if kind == "random" else \
        load(sys.argv[3], group=group, context=64)
    logits, tokens = steps(model)
    if group.rank == 0:
        np.savez(out, *logits, tokens=np.array(tokens))
