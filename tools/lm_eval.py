"""tinytensor as an lm-evaluation-harness model, and lm-eval's own command line with it registered:

    python -m tools.lm_eval --model tinytensor --model_args checkpoint=PATH --tasks mmlu --num_fewshot 5

(everything after `python -m tools.lm_eval` is lm-eval's CLI; `import tools.lm_eval` registers
the model for `lm_eval.simple_evaluate(model="tinytensor", ...)` too). model_args: checkpoint (a
folder or .gguf; default SmolLM2-135M), dtype, context. Requests go through the same prefix-reusing
scorer as `python -m tools.eval` (models/generation/scoring.py), tokenized as lm-eval's `hf` model tokenizes
them, so both give the same numbers. lm-eval is an optional extra: pip install -e '.[eval]'.
"""
import sys

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("error: tools.lm_eval needs lm-evaluation-harness: pip install -e '.[eval]'")

from models.generation.scoring import Scorer, encode, encode_pair
from tools.eval.run import fit
from tools.eval.tasks import cut_at_stops


@register_model("tinytensor")
class TinytensorLM(LM):
    def __init__(self, checkpoint=None, dtype=None, context=8192, batch_size=None, **_ignored):
        super().__init__()
        from models.llama3 import load
        self.model = load(checkpoint, dtype=dtype, context=int(context))
        self.tokenizer = self.model.tokenizer
        self.scorer = Scorer(self.model)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Consecutive requests with the same context (a question's answers) scored together."""
        out, i = [], 0
        pairs = [encode_pair(self.tokenizer, *r.args) for r in requests]
        while i < len(pairs):
            j = i + 1
            while j < len(pairs) and pairs[j][0] == pairs[i][0]:
                j += 1
            context = fit(pairs[i][0], max(len(c) for _, c in pairs[i:j]), self.model.context)
            out += self.scorer.loglikelihoods(context, [c for _, c in pairs[i:j]])
            i = j
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of the context, as lm-eval's hf model."""
        prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        totals = []
        for (text,) in (r.args for r in requests):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=encode(self.tokenizer, text), prefix_token=prefix,
                max_seq_len=self.model.context, context_len=1))
            totals.append(sum(self.scorer.loglikelihoods(list(c), [list(t)])[0][0] for c, t in windows))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation to the request's stop strings or max_gen_toks (default 256)."""
        results = []
        for context, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs)
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("tinytensor's lm-eval model generates greedily: run the task with "
                                 "do_sample=False (temperature 0)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.get("max_gen_toks", 256))
            ids = encode(self.tokenizer, context)[-(self.model.context - max_tokens):]
            out = self.scorer.greedy(ids, max_tokens, self.tokenizer.stop_ids, until, self.tokenizer.decode)
            results.append(cut_at_stops(self.tokenizer.decode(out), until))
        return results


def main(argv=None) -> int:
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
