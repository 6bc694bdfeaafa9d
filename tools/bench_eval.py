"""MMLU-style few-shot scoring speed beside lm-evaluation-harness's `hf` model, in one run:

    python -m tools.bench_eval [--checkpoint FILE] [--questions 20] [--shots 5]

One synthetic subject (questions of a few dozen words, the prompt lm-eval's mmlu YAML builds) is
scored by `tools.eval` (our scorer: the few-shot prefix and each question computed once, four
answers from one pass) and by lm-eval's `hf` model (transformers, float32, batch 4) on the same
model file; both accuracies print with the requests/s so that a difference shows. Needs the
test extras (lm-eval, transformers, torch).
"""
import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("atom cell river planet theory market law court energy signal protein orbit temple empire "
         "function matrix poem island contract virus mountain circuit language symbol").split()


def lm_eval_task(yaml: str, data_files: dict[str, str], **overrides):
    """lm-eval's own task definition (its YAML under lm_eval/tasks), reading local files."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml)
    suffix = Path(next(iter(data_files.values()))).suffix.lstrip(".")
    cfg.update(dataset_path={"jsonl": "json"}.get(suffix, suffix), dataset_name=None,
               dataset_kwargs={"data_files": data_files}, **overrides)
    cfg.pop("tag", None)
    return ConfigurableTask(config=cfg)


def synthetic_subject(folder: Path, questions: int, shots: int, seed: int = 0) -> dict[str, str]:
    import json
    rnd = random.Random(seed)
    sentence = lambda n: " ".join(rnd.choice(WORDS) for _ in range(n)).capitalize()  # noqa: E731
    files = {}
    for split, n in (("dev", shots), ("test", questions)):
        rows = [{"question": sentence(30) + "?", "subject": "anatomy", "choices": [sentence(4) for _ in range(4)],
                 "answer": rnd.randrange(4)} for _ in range(n)]
        path = folder / "anatomy" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a .gguf file or checkpoint folder (default: SmolLM2-135M)")
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--shots", type=int, default=5)
    args = p.parse_args(argv)
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.formats.assets import fetch
    from models.llama3 import load
    from tools.eval import data, tasks
    from tools.eval.run import evaluate

    path = Path(args.checkpoint) if args.checkpoint else fetch("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        files = synthetic_subject(Path(tmp), args.questions, args.shots)
        ours = load(path, context=2048)
        start = time.perf_counter()
        result = evaluate(ours, tasks.mmlu_tasks(data.mmlu(Path(tmp))), args.shots, progress=False)
        our_rate = result["speed"]["requests"] / (time.perf_counter() - start)
        our_acc = result["tasks"]["mmlu_anatomy"]["acc"]

        gguf = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        folder = path.parent if gguf else path
        hf = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf).eval(),
                  tokenizer=AutoTokenizer.from_pretrained(folder, **gguf), batch_size=4)
        task = lm_eval_task("mmlu/default/mmlu_anatomy.yaml", files)
        start = time.perf_counter()
        theirs = lm_eval.simple_evaluate(model=hf, tasks=[task], num_fewshot=args.shots)
        their_rate = 4 * args.questions / (time.perf_counter() - start)
        their_acc = theirs["results"]["mmlu_anatomy"]["acc,none"]
    print(f"\n{path.name}: {args.questions} MMLU-style questions, {args.shots}-shot, {4 * args.questions} requests")
    print(f"{'engine':32} {'requests/s':>10} {'acc':>6}")
    print(f"{'tinytensor (tools.eval)':32} {our_rate:10.2f} {our_acc:6.3f}")
    print(f"{'lm-eval hf (transformers f32)':32} {their_rate:10.2f} {their_acc:6.3f}")
    print(f"{'  ratio':32} {our_rate / their_rate:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
