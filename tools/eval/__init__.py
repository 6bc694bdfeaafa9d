"""Evaluation (`python -m tools.eval`): MMLU, CommonsenseQA and TriviaQA from local files,
prompted and scored as lm-evaluation-harness does (tasks.py), read from the forms users keep
(data.py), run with the model's prefix-reusing scorer (models/generation/scoring.py) and summed up (run.py).
tools/lm_eval.py makes the same scorer an lm-evaluation-harness model."""
