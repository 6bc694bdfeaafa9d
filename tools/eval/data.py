"""The evaluation data sets in the forms users keep on disk, read into the documents
lm-evaluation-harness's tasks see (the Hugging Face datasets' rows), split by split.

- MMLU: the original folder (`dev/`, `val/`, `test/` of `SUBJECT_SPLIT.csv`, no header: question,
  four choices, answer letter), or the files of `cais/mmlu` (parquet, arrow, json, jsonl with
  `question`, `subject`, `choices`, `answer`), one folder per subject or `all/`.
- CommonsenseQA: the original `*_rand_split*.jsonl`, or the files of `tau/commonsense_qa`.
- TriviaQA: the files of `mandarjoshi/trivia_qa` (`rc.nocontext`), or the original JSON
  (`{"Data": [{"Question", "QuestionId", "Answer": {"Aliases", ...}}]}`).

A file's split comes from its name (`dev`, `val`/`validation`, `test`, `train`), as the hub's
file names and the original releases name them. Every problem is a DataError naming the file.
"""
import csv
import json
import re
from pathlib import Path

from tinytensor.errors import UserError

TABLE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")
SPLITS = {"dev": "dev", "val": "validation", "validation": "validation", "test": "test", "train": "train"}


class DataError(UserError):
    """A data file that is missing, unreadable or not in the expected form (one line)."""


def split_of(path: Path, dev: str = "dev") -> str | None:
    """The split a file holds, from the words of its name (`mmlu-test.arrow`, `web-dev.json`);
    `dev` names the split a "dev" file holds (MMLU's few-shot split; elsewhere the validation one)."""
    for word in re.split(r"[^a-z]+", path.name.lower()):
        if word in SPLITS:
            return dev if word == "dev" else SPLITS[word]
    return None


def table_files(root: Path) -> list[Path]:
    if not root.exists():
        raise DataError(f"{root}: no such file or folder: give the data set's folder or file with --data")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in TABLE_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no data files in it (looked for {', '.join(TABLE_SUFFIXES)})")
    return files


def read_rows(path: Path) -> list[dict]:
    """The rows of a parquet, arrow (HF datasets' cache), json or jsonl file, as dicts."""
    try:
        if path.suffix in (".parquet", ".arrow"):
            return _arrow_rows(path)
        text = path.read_text(encoding="utf-8")
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:  # JSON lines, whatever the suffix (HF's json files often are)
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    if isinstance(rows, dict) and isinstance(rows.get("Data"), list):  # TriviaQA's original JSON
        return rows["Data"]
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows or TriviaQA's {{\"Data\": [...]}}")
    return rows


def _arrow_rows(path: Path) -> list[dict]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading parquet and arrow files needs pyarrow: pip install -e '.[eval]'") from None
    try:
        if path.suffix == ".parquet":
            table = pyarrow.parquet.read_table(path)
        else:  # HF datasets' cache files are Arrow IPC streams; plain Arrow files also occur
            with open(path, "rb") as f:
                magic = f.read(6)
            opener = pyarrow.ipc.open_file if magic == b"ARROW1" else pyarrow.ipc.open_stream
            with pyarrow.memory_map(str(path)) as source:
                table = opener(source).read_all()
    except (OSError, pyarrow.ArrowException) as e:
        raise DataError(f"{path}: not a readable {path.suffix[1:]} file ({e})") from None
    return table.to_pylist()


def _need(row, keys: tuple[str, ...], path: Path, form: str) -> None:
    if not isinstance(row, dict) or any(k not in row for k in keys):
        raise DataError(f"{path}: rows must have {', '.join(keys)} ({form}); found "
                        f"{', '.join(row) if isinstance(row, dict) else type(row).__name__}")


# ---- MMLU ----------------------------------------------------------------------------------------

def mmlu(root: Path) -> dict[str, dict[str, list[dict]]]:
    """{subject: {split: [doc, ...]}}, docs as cais/mmlu's rows: question, subject, choices, answer (0-3)."""
    subjects: dict[str, dict[str, list[dict]]] = {}
    files = table_files(root)
    csvs = [f for f in files if f.suffix == ".csv"]
    if csvs:
        for f in csvs:
            match = re.fullmatch(r"(.+)_(dev|val|test)", f.stem)
            if not match:
                raise DataError(f"{f}: MMLU's CSV files are named SUBJECT_dev.csv, SUBJECT_val.csv or SUBJECT_test.csv")
            subject, split = match.group(1), SPLITS[match.group(2)]
            subjects.setdefault(subject, {})[split] = _mmlu_csv(f, subject)
        return subjects
    per_subject = [f for f in files if f.parent.name not in ("all", "auxiliary_train")]
    for f in per_subject or [f for f in files if f.parent.name == "all"]:
        split = split_of(f)
        if split is None or split == "train":
            continue
        for row in read_rows(f):
            _need(row, ("question", "subject", "choices", "answer"), f, "cais/mmlu's columns")
            if len(row["choices"]) != 4 or row["answer"] not in range(4):
                raise DataError(f"{f}: an MMLU row needs 4 choices and an answer 0-3, got {row['choices']!r}, "
                                f"{row['answer']!r}")
            subjects.setdefault(row["subject"], {}).setdefault(split, []).append(row)
    if not subjects:
        raise DataError(f"{root}: no MMLU rows found (expected dev/val/test CSV files or cais/mmlu's "
                        f"parquet/arrow/json files with dev, validation or test in their names)")
    return subjects


def _mmlu_csv(path: Path, subject: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    docs = []
    for n, row in enumerate(rows, 1):
        if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
            raise DataError(f"{path}: line {n} has {len(row)} columns; MMLU's CSV rows are question, "
                            f"A, B, C, D, answer letter (A-D)")
        docs.append({"question": row[0], "subject": subject, "choices": row[1:5],
                     "answer": "ABCD".index(row[5].strip())})
    return docs


# ---- CommonsenseQA and TriviaQA: a validation split scored, a train split for few-shot ------------

def _docs_by_split(root: Path, to_doc) -> dict[str, list[dict]]:
    """{split: [to_doc(row, file)]} over the data files whose names say their split."""
    splits: dict[str, list[dict]] = {}
    for f in table_files(root):
        split = split_of(f, dev="validation")
        if split is not None:
            splits.setdefault(split, []).extend(to_doc(row, f) for row in read_rows(f))
    return splits


def commonsense_qa(root: Path) -> dict[str, list[dict]]:
    """{split: [doc]}, docs as tau/commonsense_qa's rows: question, choices {label, text}, answerKey."""
    return _docs_by_split(root, _commonsense_qa_doc)


def _commonsense_qa_doc(row, f: Path) -> dict:
    if isinstance(row, dict) and isinstance(row.get("question"), dict):  # the original jsonl
        _need(row["question"], ("stem", "choices"), f, "CommonsenseQA's original question")
        choices = row["question"]["choices"]
        row = {"id": row.get("id"), "question": row["question"]["stem"],
               "question_concept": row["question"].get("question_concept"),
               "choices": {"label": [c["label"] for c in choices], "text": [c["text"] for c in choices]},
               "answerKey": row.get("answerKey", "")}
    _need(row, ("question", "choices", "answerKey"), f, "tau/commonsense_qa's columns")
    if len(row["choices"]["text"]) != 5:
        raise DataError(f"{f}: a CommonsenseQA row needs 5 choices, got {len(row['choices']['text'])}")
    return row


def triviaqa(root: Path) -> dict[str, list[dict]]:
    """{split: [doc]}, docs as trivia_qa's rc.nocontext rows: question, question_id, answer {aliases, ...}."""
    return _docs_by_split(root, _triviaqa_doc)


def _triviaqa_doc(row, f: Path) -> dict:
    if isinstance(row, dict) and "Question" in row:  # the original JSON
        _need(row, ("Question", "Answer"), f, "TriviaQA's original JSON")
        answer = row["Answer"]
        row = {"question": row["Question"], "question_id": row.get("QuestionId"),
               "answer": {"aliases": answer.get("Aliases", []), "value": answer.get("Value"),
                          "normalized_aliases": answer.get("NormalizedAliases", [])}}
    _need(row, ("question", "answer"), f, "trivia_qa's columns")
    if not isinstance(row["answer"], dict) or "aliases" not in row["answer"]:
        raise DataError(f"{f}: a TriviaQA row's answer needs its aliases")
    return row
