"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) generates exactly what transformers generates
from the same file (it dequantizes it the same way), token for token."""
import numpy as np
import pytest
import torch

from models.chat import chat_tokens
from models.llama3 import load
from models.sampling import make_sampler

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers."]


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return load(smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_matches_transformers(backend, ours, reference, prompt):
    ids = chat_tokens(ours.tokenizer, [{"role": "user", "content": prompt}])
    got = list(ours.generate(ids, 32, make_sampler(temperature=0), ours.tokenizer.stop_ids))
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=sorted(ours.tokenizer.stop_ids), pad_token_id=2)
    want = [t for t in out[0, len(ids):].tolist() if t not in ours.tokenizer.stop_ids]
    assert got == want, f"{ours.tokenizer.decode(got)!r} != {ours.tokenizer.decode(want)!r}"


def test_prefill_logits_match_transformers(backend, ours, reference):
    ids = chat_tokens(ours.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
    # float32 through 30 layers, logits up to ~40: summation order alone moves them by ~1e-4
    # (8.6e-5 seen). Bound: 1e-5 of the largest logit, about 84 float32 ulps at that scale.
    np.testing.assert_allclose(ours.logits(ids), want, atol=1e-5 * np.abs(want).max(), rtol=0)
