"""Evaluation against lm-evaluation-harness itself, on small task files written here in each form
users keep (MMLU's CSV folders and cais/mmlu's parquet, CommonsenseQA's jsonl and parquet,
TriviaQA's JSON and parquet): lm-eval's own task definitions (its YAML, pointed at these files)
build the prompts ours must equal, and its `hf` model (transformers, float32) gives the
log-likelihoods and generations ours must match, for the real SmolLM2 and a random Llama 3.2."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a test dependency: pip install -e '.[test]'")
import lm_eval  # noqa: E402
import pyarrow  # noqa: E402
import pyarrow.parquet  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from models.generation.scoring import Scorer, encode_pair  # noqa: E402
from tools.bench_eval import lm_eval_task  # noqa: E402
from tools.eval import data, tasks  # noqa: E402
from tools.eval.__main__ import load_tasks  # noqa: E402
from tools.eval.run import evaluate  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.oracle]

MMLU = {
    "anatomy": {"dev": [("What is the largest bone?", ["Femur", "Tibia", "Ulna", "Skull"], 0),
                        ("How many chambers has the human heart?", ["Two", "Three", "Four", "Five"], 2),
                        ("Which organ filters the blood?", ["Lung", "Kidney", "Skin", "Eye"], 1)],
                "test": [("Where is the tibia?", ["Arm", "Leg", "Head", "Chest"], 1),
                         ("What does the lung exchange?", ["Gases", "Bones", "Hair", "Salt"], 0),
                         ("  What pumps blood?  ", ["Liver", "Brain", "Heart", "Stomach"], 2)]},
    "astronomy": {"dev": [("Which planet is red?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
                          ("What is the Sun?", ["A planet", "A moon", "A star", "A comet"], 2),
                          ("Which is the largest planet?", ["Earth", "Mars", "Jupiter", "Mercury"], 2)],
                  "test": [("What orbits the Earth?", ["The Moon", "Mars", "The Sun", "Venus"], 0),
                           ("How many planets are in the Solar System?", ["Seven", "Eight", "Nine", "Ten"], 1)]},
}
CSQA_TRAIN = [("Where do you keep milk cold?", ["oven", "fridge", "desk", "car", "garden"], "B"),
              ("What do people use to write?", ["spoon", "shoe", "pen", "cup", "bed"], "C"),
              ("Where would you find a book?", ["library", "ocean", "sky", "volcano", "cloud"], "A"),
              ("What do you wear on your feet?", ["hat", "glove", "scarf", "shoes", "ring"], "D")]
CSQA_VALIDATION = [("Where do fish live?", ["tree", "water", "desert", "attic", "road"], "B"),
                   ("What do you sleep on?", ["bed", "stove", "roof", "fence", "window"], "A"),
                   ("What do bees make?", ["milk", "silk", "wax and honey", "wool", "glass"], "C")]
TRIVIA_TRAIN = [("What is the capital of Italy", ["Rome", "Roma"]),
                ("Which planet is known as the Red Planet", ["Mars"]),
                ("What is the largest ocean on Earth", ["Pacific", "Pacific Ocean"]),
                ("Who wrote Romeo and Juliet", ["William Shakespeare", "Shakespeare"])]
TRIVIA_VALIDATION = [("What is the capital of France", ["Paris", "Paris, France"]),
                     ("How many legs does a spider have", ["8", "Eight"]),
                     ("What colour is the sky on a clear day", ["Blue"])]


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)


def mmlu_rows(subject, split):
    return [{"question": q, "subject": subject, "choices": c, "answer": a} for q, c, a in MMLU[subject][split]]


def csqa_rows(items):
    return [{"id": f"q{i}", "question": q, "question_concept": "thing",
             "choices": {"label": list("ABCDE"), "text": c}, "answerKey": k} for i, (q, c, k) in enumerate(items)]


def trivia_rows(items):
    return [{"question": q + "?", "question_id": f"t{i}", "answer": {"aliases": a, "value": a[0]}}
            for i, (q, a) in enumerate(items)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each data set in its Hugging Face form (parquet, as the hub's files) and its original form."""
    root = tmp_path_factory.mktemp("eval-data")
    for subject in MMLU:
        for split in ("dev", "test"):
            write_parquet(root / "mmlu-hf" / subject / f"{split}-00000-of-00001.parquet", mmlu_rows(subject, split))
            (root / "mmlu-csv" / split).mkdir(parents=True, exist_ok=True)
            with open(root / "mmlu-csv" / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([q, *c, "ABCD"[a]] for q, c, a in MMLU[subject][split])
    for split, items in (("train", CSQA_TRAIN), ("validation", CSQA_VALIDATION)):
        write_parquet(root / "csqa-hf" / "data" / f"{split}-00000-of-00001.parquet", csqa_rows(items))
        original = {"train": "train_rand_split.jsonl", "validation": "dev_rand_split.jsonl"}[split]
        (root / "csqa-orig").mkdir(exist_ok=True)
        (root / "csqa-orig" / original).write_text("".join(json.dumps(
            {"answerKey": r["answerKey"], "id": r["id"],
             "question": {"question_concept": "thing", "stem": r["question"],
                          "choices": [{"label": lab, "text": t} for lab, t in zip("ABCDE", r["choices"]["text"])]}}) + "\n"
            for r in csqa_rows(items)))
    for split, items in (("train", TRIVIA_TRAIN), ("validation", TRIVIA_VALIDATION)):
        write_parquet(root / "trivia-hf" / "rc.nocontext" / f"{split}-00000-of-00001.parquet", trivia_rows(items))
        (root / "trivia-orig" / "qa").mkdir(parents=True, exist_ok=True)
        name = {"train": "wikipedia-train.json", "validation": "wikipedia-dev.json"}[split]
        (root / "trivia-orig" / "qa" / name).write_text(json.dumps({"Version": 1.0, "Data": [
            {"Question": r["question"], "QuestionId": r["question_id"],
             "Answer": {"Aliases": r["answer"]["aliases"], "Value": r["answer"]["value"]}} for r in trivia_rows(items)]}))
    return root


def lm_eval_tasks(files: Path) -> list:
    """lm-eval's own task definitions (its YAML files), reading our files instead of the hub."""
    parquet = lambda folder, splits: {s: str(files / folder / f"{s}-00000-of-00001.parquet") for s in splits}  # noqa: E731
    return ([lm_eval_task(f"mmlu/default/mmlu_{s}.yaml", parquet(f"mmlu-hf/{s}", ("dev", "test"))) for s in MMLU]
            + [lm_eval_task("commonsense_qa/default.yaml", parquet("csqa-hf/data", ("train", "validation"))),
               lm_eval_task("triviaqa/default.yaml", parquet("trivia-hf/rc.nocontext", ("train", "validation")))])


def our_tasks(files: Path, form: str = "hf") -> list:
    return (load_tasks("mmlu", files / f"mmlu-{form}", None)
            + load_tasks("commonsense_qa", files / f"csqa-{'orig' if form == 'csv' else 'hf'}", None)
            + load_tasks("triviaqa", files / f"trivia-{'orig' if form == 'csv' else 'hf'}", None))


# ---- the data in every form --------------------------------------------------------------------

def test_each_form_reads_to_the_same_documents(files):
    assert data.mmlu(files / "mmlu-csv") == data.mmlu(files / "mmlu-hf")
    assert data.mmlu(files / "mmlu-hf")["anatomy"]["test"][2]["question"] == "  What pumps blood?  "
    keep = lambda d: (d["question"], d["choices"], d["answerKey"])  # noqa: E731
    orig, hf = data.commonsense_qa(files / "csqa-orig"), data.commonsense_qa(files / "csqa-hf")
    assert sorted(orig) == sorted(hf) == ["train", "validation"]
    assert [keep(d) for d in orig["validation"]] == [keep(d) for d in hf["validation"]]
    orig, hf = data.triviaqa(files / "trivia-orig"), data.triviaqa(files / "trivia-hf")
    assert [(d["question"], d["answer"]["aliases"]) for d in orig["validation"]] == \
           [(d["question"], d["answer"]["aliases"]) for d in hf["validation"]]


def test_arrow_and_jsonl_files_read_as_parquet(files, tmp_path):
    rows = mmlu_rows("anatomy", "test")
    table = pyarrow.Table.from_pylist(rows)
    with pyarrow.ipc.new_stream(tmp_path / "mmlu-test.arrow", table.schema) as w:  # HF datasets' cache form
        w.write_table(table)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.read_rows(tmp_path / "mmlu-test.arrow") == data.read_rows(tmp_path / "test.jsonl") == rows


# ---- prompts: lm-eval's own, few-shot draws included ---------------------------------------------

@pytest.mark.parametrize("shots", [0, 2])
def test_prompts_are_lm_evals(files, shots):
    for theirs, ours in zip(lm_eval_tasks(files), our_tasks(files)):
        theirs.set_config(key="num_fewshot", value=shots)
        theirs.set_fewshot_seed(seed=1234)
        theirs.build_all_requests(limit=None, rank=0, world_size=1)
        by_doc = {}
        for inst in theirs.instances:
            by_doc.setdefault(inst.doc_id, []).append(inst.args)
        for i, (doc, prompt) in enumerate(ours.contexts(shots)):
            if ours.kind == "multiple_choice":
                assert by_doc[i] == [(prompt, " " + c) for c in ours.choices(doc)], ours.name
            else:
                assert by_doc[i][0][0] == prompt and list(by_doc[i][0][1]["until"]) == list(tasks.TRIVIAQA_STOPS)


def test_csv_and_original_forms_give_the_same_prompts(files):
    for a, b in zip(our_tasks(files, "hf"), our_tasks(files, "csv")):
        assert [p for _, p in a.contexts(2)] == [p for _, p in b.contexts(2)]


def test_scores_as_lm_eval_scores():
    assert tasks.normalise("Paris, France.") == tasks.normalise("paris france")
    trivia = tasks.TriviaQA(name="t", docs=[], fewshot_pool=[], first_n=False)
    assert trivia.score({"answer": {"aliases": ["Paris, France"]}}, " paris France ")["exact_match"] == 1.0
    assert trivia.score({"answer": {"aliases": ["Paris"]}}, "Lyon")["exact_match"] == 0.0
    assert tasks.cut_at_stops("Paris. It is\nbig", tasks.TRIVIAQA_STOPS) == "Paris"
    mc = tasks.MMLUSubject(name="m", docs=[], fewshot_pool=[], first_n=True)
    assert mc.score({"answer": 1}, [-2.0, -1.0, -1.0, -3.0])["acc"] == 1.0  # first of equal ones, as np.argmax


# ---- the model: log-likelihoods and generations as lm-eval's hf model's ----------------------------

@pytest.fixture(scope="module", params=["smollm2", "random"])
def model_pair(request, smollm2_path, tmp_path_factory):
    """(our model, lm-eval's hf model) for the same weights: SmolLM2's GGUF dequantised to float32,
    and a random Llama 3.2 layout (dim 64, the real vocabulary and tokenizer) in float32. For the
    latter transformers reads the Hugging Face folder (with the GGUF's tokenizer): its GGUF reader
    drops Llama 3's RoPE scaling (logits off by 0.66 on this model; 1.2e-5 from the folder)."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.llama3 import load
    if request.param == "smollm2":
        path = smollm2_path
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    else:
        path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
        for layout, out in (("gguf", path), ("hf", path.parent / "hf")):
            subprocess.run([sys.executable, "-m", "tools.make_checkpoint", "--size", "tiny", "--layout", layout,
                            "--dtype", "float32", str(out)], check=True, capture_output=True)
        hf = AutoModelForCausalLM.from_pretrained(path.parent / "hf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return load(path, dtype="float32", context=2048), HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=4)


def run_lm_eval(lm, files):
    return lm_eval.simple_evaluate(model=lm, tasks=lm_eval_tasks(files), num_fewshot=2, log_samples=True,
                                   fewshot_random_seed=1234)


def adapter_for(model):
    """tools.lm_eval's model around a model already loaded."""
    from tools.lm_eval import TinytensorLM
    adapter = TinytensorLM.__new__(TinytensorLM)
    adapter.model, adapter.tokenizer, adapter.scorer = model, model.tokenizer, Scorer(model)
    lm_eval.api.model.LM.__init__(adapter)
    return adapter


def test_log_likelihoods_and_answers_match_lm_evals_hf_model(files, model_pair):
    ours, hf = model_pair
    adapter = adapter_for(ours)
    want, got = run_lm_eval(hf, files), run_lm_eval(adapter, files)
    direct = evaluate(ours, our_tasks(files), shots=2, progress=False)
    for name, samples in want["samples"].items():
        for w, g, d in zip(samples, got["samples"][name], direct["samples"][name]):
            if name == "triviaqa":
                assert g["resps"] == w["resps"] and d["answer"] == w["resps"][0][0]
                continue
            # float32 through the layers, logits up to ~40: summation order moves them by ~1e-5
            # relative (tests/models/test_smollm2.py); a log-softmax moves by at most twice that
            wl, gl = [r[0][0] for r in w["resps"]], [r[0][0] for r in g["resps"]]
            np.testing.assert_allclose(gl, wl, atol=1e-3, rtol=0)
            np.testing.assert_allclose(d["answer"], wl, atol=1e-3, rtol=0)
    for name, figures in want["results"].items():
        for metric in ("acc,none", "exact_match,remove_whitespace"):
            if metric in figures:
                assert got["results"][name][metric] == figures[metric], (name, metric)
                key = metric.split(",")[0]
                assert math.isclose(direct["tasks"][name][key], figures[metric]), (name, metric)


def test_rolling_log_likelihood_matches_lm_evals_hf_model(model_pair):
    """loglikelihood_rolling (lm-eval's perplexity tasks): the text in disjoint windows."""
    from lm_eval.api.instance import Instance
    ours, hf = model_pair
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Paris is the capital of France."]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    np.testing.assert_allclose(adapter_for(ours).loglikelihood_rolling(requests),
                               hf.loglikelihood_rolling(requests, disable_tqdm=True), atol=1e-3, rtol=0)


# ---- the scorer's prefix reuse -------------------------------------------------------------------

def test_prefix_reuse_computes_less_and_scores_the_same(model_pair):
    ours, _ = model_pair
    prompt = "The following are questions.\n\nWhat is two plus two?\nAnswer:"
    pairs = [encode_pair(ours.tokenizer, prompt, c) for c in (" four", " 4", " five apples")]
    fresh = [Scorer(ours).loglikelihoods(ctx, [cont])[0] for ctx, cont in pairs]
    shared = Scorer(ours)
    reused = [shared.loglikelihoods(ctx, [cont])[0] for ctx, cont in pairs]
    np.testing.assert_allclose([r[0] for r in reused], [f[0] for f in fresh], atol=1e-4, rtol=0)
    assert [r[1] for r in reused] == [f[1] for f in fresh]
    assert shared.tokens_computed < sum(len(c) + len(t) for c, t in pairs) - len(pairs[0][0])


# ---- the command line ----------------------------------------------------------------------------

def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "tools.eval", *args], capture_output=True, text=True)


def test_eval_command_writes_figures(files, smollm2_path, tmp_path):
    out = tmp_path / "r.json"
    done = run_eval("--task", "mmlu", "--data", str(files / "mmlu-csv"), "--shots", "1", "--limit", "2",
                    "--output", str(out))
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["tasks"]["mmlu_anatomy"]["n"] == 2 and "mmlu" in figures["groups"]
    assert "requests/s" in done.stderr and "mmlu_astronomy" in done.stdout


@pytest.mark.parametrize("problem, args, expected", [
    ("no such folder", ["--task", "mmlu", "--data", "{tmp}/nowhere"], "no such file or folder"),
    ("wrong columns", ["--task", "mmlu", "--data", "{tmp}/bad-csv"], "columns"),
    ("no validation split", ["--task", "triviaqa", "--data", "{tmp}/only-train"], "no validation split"),
    ("too many shots", ["--task", "mmlu", "--data", "{files}/mmlu-csv", "--shots", "9"], "few-shot"),
    ("unknown task", ["--task", "hellaswag", "--data", "{tmp}"], "invalid choice"),
    ("negative limit", ["--task", "mmlu", "--data", "{files}/mmlu-csv", "--limit", "0"], "--limit"),
    ("output folder missing", ["--task", "mmlu", "--data", "{files}/mmlu-csv", "--output", "{tmp}/no/r.json"],
     "existing folder"),
    ("answer not a letter", ["--task", "mmlu", "--data", "{tmp}/bad-answer"], "answer letter"),
])
def test_bad_input_is_one_line(files, tmp_path, problem, args, expected):
    (tmp_path / "bad-csv" / "test").mkdir(parents=True)
    (tmp_path / "bad-csv" / "test" / "anatomy_test.csv").write_text("question,A,B\n")
    write_parquet(tmp_path / "only-train" / "train-00000-of-00001.parquet", trivia_rows(TRIVIA_TRAIN))
    (tmp_path / "bad-answer" / "test").mkdir(parents=True)
    (tmp_path / "bad-answer" / "test" / "anatomy_test.csv").write_text("Q,a,b,c,d,AB\n")
    done = run_eval(*[a.format(tmp=tmp_path, files=files) for a in args])
    assert done.returncode == 2, (problem, done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, (problem, done.stderr)
    assert "Traceback" not in done.stderr


def test_lm_eval_command_runs_our_model(files, tmp_path):
    """`python -m tools.lm_eval`: lm-eval's own CLI with the tinytensor model registered."""
    (tmp_path / "tasks").mkdir()
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "commonsense_qa" / "default.yaml")
    cfg.update(task="csqa_local", dataset_path="parquet", dataset_kwargs={"data_files": {
        s: str(files / "csqa-hf" / "data" / f"{s}-00000-of-00001.parquet") for s in ("train", "validation")}})
    (tmp_path / "tasks" / "csqa_local.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    done = subprocess.run([sys.executable, "-m", "tools.lm_eval", "--model", "tinytensor", "--tasks", "csqa_local",
                           "--include_path", str(tmp_path / "tasks"), "--limit", "2"],
                          capture_output=True, text=True, env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "csqa_local" in done.stdout and "acc" in done.stdout


def test_output_onto_the_data_is_refused_before_the_run(files, tmp_path):
    import shutil
    data = tmp_path / "mmlu"
    shutil.copytree(files / "mmlu-csv", data)
    target = next(data.rglob("*.csv"))
    before = target.read_bytes()
    (tmp_path / "link.json").symlink_to(target)
    for output in (target, tmp_path / "link.json"):
        done = run_eval("--task", "mmlu", "--data", str(data), "--limit", "1", "--output", str(output))
        assert done.returncode == 2 and "is also an input" in done.stderr and "Traceback" not in done.stderr
    assert target.read_bytes() == before


def test_a_failed_run_leaves_earlier_results(files, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("earlier results")
    done = run_eval("--task", "mmlu", "--data", str(files / "mmlu-csv"), "--checkpoint", str(tmp_path / "none"),
                    "--output", str(out))
    assert done.returncode == 2 and out.read_text() == "earlier results"
