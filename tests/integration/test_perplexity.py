"""tools.perplexity computes what llama-perplexity computes: non-overlapping chunks, a BOS in
place of each chunk's first token, the second half of each chunk scored.

The reference below restates that with transformers' model (PyTorch, float32) on the same
checkpoint; the float32 logits agree to ~1e-5, so the perplexities agree to 1e-4 relative.
Where llama.cpp is built, llama-perplexity itself is the oracle on the same GGUF file."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="PyTorch is a test oracle: pip install -e '.[test]'")

from models.llama3 import load
from tools.perplexity import perplexity

from tests.reference import perplexities, words

pytestmark = pytest.mark.oracle

CONTEXT, CHUNKS = 64, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The Llama 3.2 layout at dim 64 (float32), as an HF folder and as a GGUF file."""
    root = tmp_path_factory.mktemp("ppl")
    for layout, out in [("hf", root / "hf"), ("gguf", root / "tiny.gguf")]:
        subprocess.run([sys.executable, "-m", "tools.make_checkpoint", "--size", "tiny", "--layout", layout,
                        "--dtype", "float32", str(out)], check=True, capture_output=True, timeout=300)
    return root


def reference_perplexity(folder, tokens: list[int], bos: int) -> float:
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    nlls = []
    for i in range(CHUNKS):
        chunk = [bos] + tokens[i * CONTEXT + 1:(i + 1) * CONTEXT]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), dim=-1)
        for k in range(CONTEXT // 2, CONTEXT - 1):
            nlls.append(-log_probs[k, tokens[i * CONTEXT + k + 1]].item())
    return math.exp(np.mean(nlls))


def test_perplexity_matches_a_transformers_restatement(tiny):
    model = load(tiny / "hf", context=CONTEXT)
    text = words(400)
    ppl, error = perplexity(model, text, CONTEXT, CHUNKS)
    tokens = model.tokenizer.encode(text, bos=True)
    want = reference_perplexity(tiny / "hf", tokens, model.tokenizer.bos_id)
    assert abs(ppl - want) <= 1e-4 * want
    assert 0 < error < ppl


def test_a_text_too_short_is_one_line(tiny, tmp_path):
    (tmp_path / "short.txt").write_text("a few words")
    result = subprocess.run([sys.executable, "-m", "tools.perplexity", "--checkpoint", str(tiny / "tiny.gguf"),
                             "--file", str(tmp_path / "short.txt"), "--context", "64"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "at least 128" in result.stderr


def test_llamacpp_gives_the_same_perplexity(tiny, tmp_path, llamacpp_bin):
    (tmp_path / "text.txt").write_text(words(2000))
    (ppl, error), (their_ppl, their_error) = perplexities(tiny / "tiny.gguf", tmp_path / "text.txt", llamacpp_bin, 128)
    # float32 weights on both sides: only summation order differs
    assert abs(ppl - their_ppl) <= 1e-3 * their_ppl and abs(error - their_error) <= 1e-2 * their_error


@pytest.mark.parametrize("ftype", ["Q4_0", "Q8_0", "Q4_K_M", "Q6_K"])
def test_llamacpp_gives_the_same_perplexity_on_its_quantised_files(smollm2_path, tmp_path, llamacpp_bin, ftype):
    """A real model (SmolLM2) in llama-quantize's files: 8-bit activations on both sides, so the
    two differ by which roundings their float orders flip, noise that averages out over the
    scored tokens (0.03-0.13% over 2,560 of them with 10 chunks); the target is 0.5%. The
    K-quant files read the activations per 256 values, as llama.cpp's q8_K does (per 32 they
    scored 0.6-0.7% lower)."""
    out = tmp_path / f"{ftype}.gguf"
    done = subprocess.run([str(llamacpp_bin / "llama-quantize"), "--allow-requantize", str(smollm2_path), str(out),
                           ftype], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (ppl, _), (their_ppl, _) = perplexities(out, Path(__file__).parents[1] / "data" / "perplexity-text.md", llamacpp_bin, 512, 8)
    assert abs(ppl - their_ppl) <= 5e-3 * their_ppl, (ppl, their_ppl)
