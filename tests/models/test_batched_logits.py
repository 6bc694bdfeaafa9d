"""A token's logits are the same bits however it was batched (issue: exact, whatever the batch):
prefilled with the whole prompt, after a cached prefix, in chunks, decoded one by one, or in a
step beside other sequences (the server's batch). Tiny random checkpoints in the float and
block formats, through the llvm kernels (tests/unit/test_batch_invariance.py covers each
kernel at every level; the NumPy reference's products are BLAS's and promise nothing here)."""
import numpy as np
import pytest

import backends
from models.formats import checkpoint
from models.formats.gguf_writer import write_gguf
from models.llama3 import KVCache, Llama
from models.llama3.config import LlamaConfig
from ops import dtypes
from tinytensor import Tensor

FORMATS = [dtypes.float32, dtypes.bfloat16, dtypes.q8_0, dtypes.q4_0, dtypes.q4_1, dtypes.q5_0, dtypes.q4_k,
           dtypes.q6_k]
IDS = [int(x) for x in np.random.default_rng(0).integers(0, 120, 37)]


@pytest.fixture(scope="module")
def llvm():
    backends.use("llvm")
    yield
    backends.use(None)


@pytest.fixture(scope="module", params=FORMATS, ids=lambda d: d.name)
def model(request, llvm, tmp_path_factory):
    """A 2-layer model (grouped-query attention, 120 tokens: a column tail after 7 steps of 16)."""
    dtype = request.param
    dim, ffn = (256, 512) if dtype.block and dtype.block.values == 256 else (64, 96)
    config = LlamaConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=120, ffn_dim=ffn, max_context=128)
    path = tmp_path_factory.mktemp(dtype.name) / "m.gguf"
    write_gguf(path, config, checkpoint.RandomArrays(config), dtype=dtype)
    return Llama(*checkpoint.load(path))


def run(model, pieces, length=64):
    """The logits of IDS fed in pieces of these lengths (then one at a time), one cache."""
    cache, rows, pos = KVCache.allocate(model.config, length), [], 0
    for n in pieces + [1] * (len(IDS) - sum(pieces)):
        rows.append(model.forward(Tensor(np.array(IDS[pos:pos + n])), pos, cache).numpy())
        pos += n
    return np.concatenate(rows)


def test_every_chunking_gives_the_prompts_logits_bit_for_bit(model):
    whole = model.logits(IDS)
    for pieces in ([37], [7, 12, 1, 1, 5], [16, 16], [3], [1]):
        assert np.array_equal(run(model, pieces), whole), pieces


def test_a_step_beside_other_sequences_gives_its_logits_alone(model):
    """forward_batch: the sequence's next token with two others at other positions."""
    others = [IDS[5:20], IDS[::-1][:9]]
    caches = [KVCache.allocate(model.config, 64) for _ in range(3)]
    for ids, cache in zip([IDS[:30]] + others, caches):
        model.forward(Tensor(np.array(ids)), 0, cache)
    tokens = [IDS[30], 7, 9]
    positions = [30, len(others[0]), len(others[1])]
    batch = model.forward_batch(Tensor(np.array(tokens)), Tensor(np.array(positions)), Tensor(np.array(positions)),
                                caches).numpy()
    assert np.array_equal(batch[0], model.logits(IDS[:31])[-1])
