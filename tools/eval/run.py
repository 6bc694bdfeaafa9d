"""Running tasks on a model and summing up, as lm-evaluation-harness reports: each task's mean
and its standard error; MMLU's categories and overall figure weighted by their subjects' sizes,
with the pooled standard error."""
import math
import time

from models.generation.scoring import Scorer, encode, encode_pair
from tools.eval.tasks import MAX_GEN_TOKENS, MMLU_CATEGORIES, TRIVIAQA_STOPS, Task, cut_at_stops


def evaluate(model, tasks: list[Task], shots: int = 0, limit: int | None = None, progress: bool = True) -> dict:
    """{"tasks": {name: figures}, "groups": {...}, "speed": {...}, "samples": {name: [...]}}."""
    from tqdm import tqdm

    work = [(task, doc, prompt) for task in tasks for doc, prompt in task.contexts(shots, limit)]
    scorer, tok = Scorer(model), model.tokenizer
    scores: dict[str, list[dict]] = {t.name: [] for t in tasks}
    samples: dict[str, list[dict]] = {t.name: [] for t in tasks}
    requests = tokens_asked = 0
    start = time.perf_counter()
    for task, doc, prompt in tqdm(work, desc="scoring", unit="question", disable=not progress, leave=False):
        if task.kind == "multiple_choice":
            pairs = [encode_pair(tok, prompt, " " + c) for c in task.choices(doc)]
            context = fit(pairs[0][0], max(len(c) for _, c in pairs), model.context)
            found = scorer.loglikelihoods(context, [c for _, c in pairs])
            result = task.score(doc, [ll for ll, _ in found])
            answer = [ll for ll, _ in found]
            requests += len(pairs)
            tokens_asked += sum(len(context) + len(c) - 1 for _, c in pairs)
        else:
            context = encode(tok, prompt)[-(model.context - MAX_GEN_TOKENS):]
            ids = scorer.greedy(context, MAX_GEN_TOKENS, tok.stop_ids, TRIVIAQA_STOPS, tok.decode)
            answer = cut_at_stops(tok.decode(ids), TRIVIAQA_STOPS)
            result = task.score(doc, answer)
            requests += 1
            tokens_asked += len(context) + len(ids)
        scores[task.name].append(result)
        samples[task.name].append({"prompt": prompt, "answer": answer, **result})
    seconds = time.perf_counter() - start
    out = {"tasks": {t.name: figures(scores[t.name]) for t in tasks}, "groups": mmlu_groups(tasks, scores),
           "speed": {"seconds": round(seconds, 2), "requests": requests, "requests_per_s": requests / seconds,
                     "tokens_computed": scorer.tokens_computed, "tokens_per_s": scorer.tokens_computed / seconds,
                     "tokens_without_prefix_reuse": tokens_asked},
           "samples": samples}
    return out


def fit(context: list[int], longest: int, length: int) -> list[int]:
    """The context cut from the left so that context + continuation (less its last token) fits
    the model, as lm-eval's hf model cuts a request."""
    over = len(context) + longest - 1 - length
    return context[over:] if over > 0 else context


def figures(scores: list[dict]) -> dict:
    out = {"n": len(scores)}
    for metric in scores[0] if scores else ():
        values = [s[metric] for s in scores]
        mean = sum(values) / len(values)
        out[metric] = mean
        out[f"{metric}_stderr"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                                   / math.sqrt(len(values))) if len(values) > 1 else None
    return out


def mmlu_groups(tasks: list[Task], scores: dict[str, list[dict]]) -> dict:
    """MMLU's categories and `mmlu` itself: acc weighted by subject size, pooled stderr."""
    groups = {}
    subjects = [t for t in tasks if t.name.startswith("mmlu_")]
    for name in list(MMLU_CATEGORIES) + ["mmlu"]:
        members = [t for t in subjects if name == "mmlu" or t.group == name]
        members = [t for t in members if scores[t.name]]
        if not members:
            continue
        parts = [figures(scores[t.name]) for t in members]
        sizes = [p["n"] for p in parts]
        acc = sum(p["acc"] * n for p, n in zip(parts, sizes)) / sum(sizes)
        stderr = None
        if all(p["acc_stderr"] is not None for p in parts) and sum(sizes) > len(sizes):
            pooled = sum((n - 1) * p["acc_stderr"] ** 2 * n for p, n in zip(parts, sizes)) / (sum(sizes) - len(sizes))
            stderr = math.sqrt(pooled / sum(sizes))
        groups[f"mmlu_{name}" if name != "mmlu" else "mmlu"] = {"n": sum(sizes), "acc": acc, "acc_stderr": stderr}
    return groups


def table(results: dict) -> str:
    """A readable table of the figures: groups first, then each task."""
    rows = [("task", "n", "metric", "value", "stderr")]
    for section in ("groups", "tasks"):
        for name, f in results[section].items():
            for metric in (m for m in f if m != "n" and not m.endswith("_stderr")):
                err = f[f"{metric}_stderr"]
                rows.append((name, str(f["n"]), metric, f"{f[metric]:.4f}", "-" if err is None else f"{err:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 or i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])
