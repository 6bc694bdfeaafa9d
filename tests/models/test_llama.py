"""The Llama model against transformers' LlamaForCausalLM (PyTorch CPU, float32) on random
checkpoints it wrote itself, and the same weights through every on-disk layout.

Tolerance: max |logit difference| <= 1e-4 in float32, as the issue sets. Both sides compute
in float32 over at most a few hundred terms per dot product with O(1) values; the difference
is the order of summation (~1e-6 here), so 1e-4 leaves room without hiding a wrong formula
(a wrong RoPE pairing or mask moves logits by O(0.1))."""
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="PyTorch is a test oracle: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test oracle: pip install -e '.[test]'")
from transformers import LlamaConfig as HFConfig, LlamaForCausalLM  # noqa: E402

from models.formats import checkpoint
from models.formats.gguf_writer import write_gguf
from models.llama3 import KVCache, Llama
from models.llama3.config import LlamaConfig, meta_ffn_dim
from ops import dtypes
from tests.reference import nmse, q8_nmse_per_product, quantised_products_on_path
from tinytensor import Tensor
from tools import make_checkpoint

pytestmark = pytest.mark.oracle

TOL = 1e-4
PROMPT = [3, 17, 5, 88, 42, 1, 0, 101, 11, 12, 50, 7]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

SHAPES = {  # GQA ratio 1, 3 and 4; tied and untied heads; rope scaling on and off
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_scaling=None),
    "gqa3-tied-scaled": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_scaling=LLAMA3_ROPE),
    "gqa4-untied-scaled": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                               rope_scaling=LLAMA3_ROPE),
}


# params.json cannot say rope scaling parameters: Meta checkpoints use the published ones
LAYOUT_SHAPE = dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                    rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 8192})


def hf_model(shape: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=102, hidden_size=48, intermediate_size=meta_ffn_dim(48, 32, None),
                   num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                   **(SHAPES[shape] if shape in SHAPES else LAYOUT_SHAPE))
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # O(1) activations, so a wrong formula shows up in the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def hf_checkpoint(request, tmp_path_factory):
    model = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].numpy()
    return folder, logits


def test_prefill_logits_match_transformers(backend, hf_checkpoint):
    folder, want = hf_checkpoint
    model = Llama(*checkpoint.load(folder))
    got = model.logits(PROMPT)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL


def test_every_decode_step_matches_transformers(backend, hf_checkpoint):
    folder, want = hf_checkpoint
    model = Llama(*checkpoint.load(folder))
    cache = KVCache.allocate(model.config, len(PROMPT))
    first = 5  # a prompt of five, then one token per step
    got = [model.forward(Tensor(np.array(PROMPT[:first])), 0, cache).numpy()]
    for pos in range(first, len(PROMPT)):
        got.append(model.forward(Tensor(np.array([PROMPT[pos]])), pos, cache).numpy())
    got = np.concatenate(got)
    assert np.abs(got - want).max() <= TOL


@pytest.fixture(scope="module")
def weights_and_logits(tmp_path_factory):
    """One model's weights in Meta's form (as our HF loader reads them) and its logits."""
    model = hf_model("gqa4-untied-llama31")
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    config, weights, _ = checkpoint.load(folder)
    return config, {k: v.numpy() for k, v in weights.items()}, Llama(config, weights).logits(PROMPT)


def test_meta_layout_in_two_shards_gives_the_same_logits(weights_and_logits, tmp_path):
    config, arrays, want = weights_and_logits
    make_checkpoint.write_meta(tmp_path / "meta", config, arrays, dtypes.float32, shards=2, ffn=(32, None))
    loaded = checkpoint.load(tmp_path / "meta")
    assert loaded[0].ffn_dim == config.ffn_dim and loaded[0].rope_scaling is not None
    assert np.abs(Llama(*loaded).logits(PROMPT) - want).max() <= TOL


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16, dtypes.bfloat16], ids=lambda d: d.name)
def test_gguf_layout_gives_the_same_logits(weights_and_logits, tmp_path, dtype):
    config, arrays, want = weights_and_logits
    write_gguf(tmp_path / "m.gguf", config, arrays, dtype=dtype)
    if dtype != dtypes.float32:  # the reference holds the same half-precision-rounded matrices
        rounded = {k: Tensor(v, dtype=dtype).cast(dtypes.float32) if v.ndim > 1 else Tensor(v) for k, v in arrays.items()}
        want = Llama(config, rounded).logits(PROMPT)
    assert np.abs(Llama(*checkpoint.load(tmp_path / "m.gguf")).logits(PROMPT) - want).max() <= TOL


@pytest.mark.parametrize("dtype", dtypes.BLOCKS, ids=lambda d: d.name)
def test_quantised_gguf_is_computed_as_stored(backend, tmp_path, dtype):
    """A Q8_0/Q4_0/... file keeps its blocks (never expanded) and gives the logits of the same
    model with those blocks dequantised to float32, but for its activations' 8-bit rounding
    (see reference.q8_nmse_per_product): the float model is the oracle, the rounding's noise
    the bound."""
    dim, ffn = (64, 96) if dtype.block.values == 32 else (256, 512)  # whole blocks in every row
    config = LlamaConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=120, ffn_dim=ffn, max_context=64)
    write_gguf(tmp_path / "m.gguf", config, checkpoint.RandomArrays(config), dtype=dtype)
    config2, weights, _ = checkpoint.load(tmp_path / "m.gguf")
    assert weights["layers.0.feed_forward.w1.weight"].dtype == dtype
    want = Llama(config2, {k: Tensor(w.numpy()) for k, w in weights.items()}).logits(PROMPT)
    got = Llama(config2, weights).logits(PROMPT)
    assert nmse(got, want) <= quantised_products_on_path(config.n_layers) * q8_nmse_per_product(dtype.block.values)


def test_bfloat16_hf_checkpoint_loads_as_stored(weights_and_logits, tmp_path):
    config, arrays, _ = weights_and_logits
    make_checkpoint.write_hf(tmp_path / "bf16", config, arrays, dtypes.bfloat16, shard_bytes=20_000)
    assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()  # sharded
    config2, weights, _ = checkpoint.load(tmp_path / "bf16")
    assert weights["layers.0.attention.wq.weight"].dtype == dtypes.bfloat16
    rounded = {k: Tensor(v, dtype=dtypes.bfloat16) for k, v in arrays.items()}
    want = Llama(config, rounded).logits(PROMPT)
    assert np.abs(Llama(config2, weights).logits(PROMPT) - want).max() <= TOL


@pytest.mark.parametrize("dtype", [dtypes.q8_0, dtypes.q4_0], ids=lambda d: d.name)
def test_bfloat16_checkpoint_quantised_at_load(weights_and_logits, tmp_path, dtype):
    """load(path, dtype="q8_0"): a bf16 HF folder quantised in memory holds the very blocks
    llama-quantize's layout would (our GGUF writer's, from the same bf16 values); norms, and
    matrices whose rows are not whole blocks (this model's dim is 48), stay as stored."""
    config, arrays, _ = weights_and_logits
    make_checkpoint.write_hf(tmp_path / "bf16", config, arrays, dtypes.bfloat16)
    config2, weights, _ = checkpoint.load(tmp_path / "bf16", dtype=dtype.name)
    assert weights["layers.0.feed_forward.w2.weight"].dtype == dtype
    assert weights["norm.weight"].dtype == dtypes.bfloat16
    values = {k: w.cast(dtypes.float32).numpy() for k, w in checkpoint.load(tmp_path / "bf16")[1].items()}
    write_gguf(tmp_path / "m.gguf", config2, values, dtype=dtype)
    _, stored, _ = checkpoint.load(tmp_path / "m.gguf")
    quantised = [name for name, w in weights.items() if w.dtype == dtype]
    assert quantised == [name for name, w in stored.items() if w.dtype == dtype]
    assert len(quantised) == config.n_layers  # the down projections: rows of ffn_dim = 128
    for name in quantised:
        assert np.array_equal(weights[name].numpy(), stored[name].numpy()), name
    assert all(weights[name].dtype == dtypes.bfloat16 for name in weights if name not in quantised)


def test_a_sharded_save_pretrained_folder_reads_through_its_index(tmp_path):
    """transformers' own sharded layout (model.safetensors.index.json naming the shards): every
    shard opened through the index, inside the folder, the same logits."""
    model = hf_model(next(iter(SHAPES)))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    with torch.no_grad():
        want = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(Llama(*checkpoint.load(tmp_path)).logits(PROMPT) - want).max() <= TOL
