"""Evaluate a model on MMLU, CommonsenseQA or TriviaQA from local files, scored as
lm-evaluation-harness scores them:

    python -m tools.eval --checkpoint PATH --task mmlu --data ~/data/mmlu --shots 5

--data is the data set's folder (or one file) in any form tools/eval/data.py reads. The table
goes to stdout, the figures (and with --samples, every question's prompt and answer) to --output
as JSON, speed to stderr.
"""
import json
import sys
from pathlib import Path

TASKS = ("mmlu", "commonsense_qa", "triviaqa")


def load_tasks(name: str, data: Path, subjects: list[str] | None):
    from tools.eval import data as datasets
    from tools.eval import tasks
    if name == "mmlu":
        return tasks.mmlu_tasks(datasets.mmlu(data), subjects)
    if subjects:
        raise ValueError("--subjects is for MMLU")
    if name == "commonsense_qa":
        return [tasks.split_task(tasks.CommonsenseQA, name, datasets.commonsense_qa(data))]
    return [tasks.split_task(tasks.TriviaQA, name, datasets.triviaqa(data))]


def main(argv=None) -> int:
    from models.generation.cli import OneLineParser
    from ops import dtypes
    p = OneLineParser(prog="python -m tools.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", type=Path, required=True, help="the data set's folder or file")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per question (default 0, as lm-eval)")
    p.add_argument("--limit", type=int, help="score only the first N questions of each task (as lm-eval's --limit)")
    p.add_argument("--subjects", help="MMLU: comma-separated subjects (default: all in the data)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", *(d.name for d in dtypes.BLOCKS)],
                   help="the weights' dtype, as models.llama3 --dtype (default: as stored)")
    p.add_argument("--context", type=int, default=8192, help="positions the model holds (default 8192)")
    p.add_argument("--output", type=Path, help="write the figures as JSON here")
    p.add_argument("--samples", action="store_true", help="with --output: every question's prompt and answer too")
    args = p.parse_args(argv)
    from models.llama3 import load
    from tinytensor.errors import UserError
    from tinytensor.state import files
    from tools.eval.run import evaluate, table
    try:
        if args.shots < 0:
            raise ValueError(f"--shots {args.shots}: give 0 or more")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit {args.limit}: give at least 1")
        if args.output and (args.output.is_dir() or not args.output.parent.is_dir()):
            raise ValueError(f"--output {args.output}: give a file name in an existing folder")
        if args.output:  # checked before the run, not after it
            files.refuse_inputs(args.output, [p for p in (args.data, args.checkpoint) if p is not None])
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        tasks = load_tasks(args.task, args.data, subjects)
        model = load(args.checkpoint, dtype=args.dtype, context=args.context)
        results = evaluate(model, tasks, args.shots, args.limit)
    except (UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    speed = results["speed"]
    print(f"{speed['requests']} requests in {speed['seconds']:.1f} s: {speed['requests_per_s']:.2f} requests/s, "
          f"{speed['tokens_per_s']:.1f} tokens/s ({speed['tokens_computed']} tokens computed; "
          f"{speed['tokens_without_prefix_reuse']} without prefix reuse)", file=sys.stderr)
    print(table(results))
    if args.output:
        keep = results if args.samples else {k: v for k, v in results.items() if k != "samples"}
        record = {"checkpoint": args.checkpoint, "task": args.task, "data": str(args.data), "shots": args.shots,
                  "limit": args.limit, **keep}
        try:  # whole or not at all: a failed write leaves an earlier results file as it was
            with files.new_file(args.output, replace=True) as partial:
                partial.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"error: --output {args.output}: {e.strerror or e}; the figures are above", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
