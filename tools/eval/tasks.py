"""MMLU, CommonsenseQA and TriviaQA as lm-evaluation-harness (0.4) builds and scores them, so the
figures compare with published ones and with `lm_eval --model hf` on the same files.

A prompt is the task's description, then the few-shot examples (each its question text, a space,
its answer, a blank line), then the question text. Multiple choice scores the log-likelihood of a
space and each answer letter after it (`acc`: the best one is the gold one); TriviaQA generates
greedily to its stop strings and compares the text, stripped, with each alias, ignoring case and
punctuation (`exact_match`). Few-shot examples: MMLU takes its dev split's first K (as lm-eval's
`first_n`); the others draw K + 1 from the train split with Python's random.Random(1234), one draw
per evaluated question in order, and keep the first K that are not the question itself (as
lm-eval's default sampler does with its default seed when the task names no few-shot split).
"""
import random
import string
from dataclasses import dataclass

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
TRIVIAQA_STOPS = ("\n", ".", ",")
MAX_GEN_TOKENS = 256  # lm-eval's default for generate_until

# MMLU's subjects by lm-eval's category (its `mmlu_stem`, ... groups)
MMLU_CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
}
MMLU_CATEGORY = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects.split()}


@dataclass
class Task:
    """One scored task (an MMLU subject is one): its questions, few-shot pool and prompt parts."""
    name: str
    docs: list[dict]
    fewshot_pool: list[dict]
    first_n: bool                    # few-shot examples: the pool's first K, else a seeded draw
    description: str = ""
    group: str | None = None         # MMLU's category
    kind = "multiple_choice"         # or "generate_until" (a class attribute, not a field)

    def text(self, doc: dict) -> str:
        raise NotImplementedError

    def target(self, doc: dict) -> str:
        """The answer as a few-shot example shows it."""
        raise NotImplementedError

    def contexts(self, shots: int, limit: int | None = None):
        """(doc, prompt) for the first `limit` docs, the few-shot examples drawn as lm-eval draws them."""
        if shots + (0 if self.first_n else 1) > len(self.fewshot_pool):
            raise ValueError(f"{self.name}: {shots} few-shot examples asked for, but its few-shot split has "
                             f"{len(self.fewshot_pool)}{'' if self.first_n else ' (lm-eval draws one more)'}")
        rnd = random.Random(FEWSHOT_SEED)
        for doc in self.docs[:limit]:
            if shots == 0:
                examples = []
            elif self.first_n:
                examples = self.fewshot_pool[:shots]
            else:  # lm-eval draws one more than it needs and drops the question itself if drawn
                examples = [e for e in rnd.sample(self.fewshot_pool, shots + 1) if e != doc][:shots]
                if len(examples) < shots:
                    examples = rnd.sample([e for e in self.fewshot_pool if e != doc], shots)
            shown = "".join(f"{self.text(e)} {self.target(e)}\n\n" for e in examples)
            yield doc, self.description + shown + self.text(doc)


class MultipleChoice(Task):
    letters = "ABCD"

    def choices(self, doc: dict) -> list[str]:
        return list(self.letters)

    def gold(self, doc: dict) -> int:
        raise NotImplementedError

    def target(self, doc: dict) -> str:
        return self.letters[self.gold(doc)]

    def score(self, doc: dict, loglikelihoods: list[float]) -> dict:
        best = max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))  # first of ties, as np.argmax
        return {"acc": float(best == self.gold(doc))}


class MMLUSubject(MultipleChoice):
    def text(self, doc):
        c = doc["choices"]
        return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    def gold(self, doc):
        return int(doc["answer"])


class CommonsenseQA(MultipleChoice):
    letters = "ABCDE"

    def text(self, doc):
        c = doc["choices"]["text"]
        return (f"Question: {doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nE. {c[4]}"
                f"\nAnswer:")

    def gold(self, doc):
        key = doc["answerKey"]
        return self.letters.index(key) if key in self.letters else -100  # lm-eval's "no label" index

    def target(self, doc):
        return doc["answerKey"]


class TriviaQA(Task):
    kind = "generate_until"

    def text(self, doc):
        return f"Question: {doc['question']}?\nAnswer:"

    def target(self, doc):
        return doc["answer"]["aliases"][0]

    def score(self, doc: dict, generated: str) -> dict:
        answer = normalise(generated.strip())
        return {"exact_match": float(any(normalise(a) == answer for a in doc["answer"]["aliases"]))}


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """lm-eval's exact_match with ignore_case and ignore_punctuation."""
    return text.lower().translate(_NO_PUNCTUATION)


def cut_at_stops(text: str, stops) -> str:
    """The generated text up to the first of each stop string in turn, as lm-eval cuts it."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


# ---- building the tasks from the data -----------------------------------------------------------

def mmlu_tasks(subjects: dict[str, dict[str, list[dict]]], wanted: list[str] | None = None) -> list[Task]:
    names = sorted(subjects) if not wanted else wanted
    unknown = [s for s in names if s not in subjects]
    if unknown:
        raise ValueError(f"no MMLU subject {unknown[0]!r} in the data; it has {', '.join(sorted(subjects))}")
    tasks = []
    for s in names:
        if "test" not in subjects[s]:
            raise ValueError(f"MMLU subject {s!r} has no test split in the data")
        tasks.append(MMLUSubject(
            name=f"mmlu_{s}", docs=subjects[s]["test"], fewshot_pool=subjects[s].get("dev", []), first_n=True,
            description=f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
            group=MMLU_CATEGORY.get(s)))
    return tasks


def split_task(cls, name: str, splits: dict[str, list[dict]]) -> Task:
    if "validation" not in splits:
        raise ValueError(f"{name}: the data has no validation split (the split lm-eval scores); found "
                         f"{', '.join(sorted(splits)) or 'none'}")
    return cls(name=name, docs=splits["validation"], fewshot_pool=splits.get("train", []), first_n=False)
