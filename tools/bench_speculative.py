"""Speculative decoding's speed on tasks whose output copies its input, beside plain decoding of
the same model in the same run (`python -m tools.bench --lookup N` or `--draft CHECKPOINT`).

Each task is a greedy chat reply; the rounds alternate plain and speculative decoding, each
with its own cache kept between rounds (as a server slot or a chat keeps it; the captured passes
with it), after one untimed round of each; the pace of drafting is kept too. Decode tok/s counts
the reply's tokens after the first over the time after the prefill. The two replies must be the
same text (they are the same tokens by construction: speculative decoding never changes them)."""
import statistics
import time

from models.generation import speculative
from models.generation.sampling import make_sampler
from models.generation.sequence_cache import CachedSequence
from models.text.chat import chat_tokens

PARAGRAPH = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, "
             "the members agreed to increase funding for the library by ten percent, to repair the roof of the "
             "community hall before winter, and to hire two more staff for the summer programme. The chair thanked "
             "everyone for their patience and closed the meeting at half past nine.")
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
'''
TASKS = {
    "rewrite a paragraph, one word changed": f"Rewrite this paragraph exactly, changing only 'Tuesday' to 'Monday':\n\n{PARAGRAPH}",
    "rename a variable in code": f"Rewrite this Python function exactly, renaming `subtotal` to `net`. Reply with the code only.\n\n{CODE}",
}


def decode_rate(model, sequence, ids, tokens, proposer=None, pace=None, stats=None) -> tuple[float, list[int]]:
    prefilled, sampler, stops = [], make_sampler(temperature=0), model.tokenizer.stop_ids
    mark = lambda: prefilled.append(time.perf_counter())  # noqa: E731
    if proposer is None:
        out = list(sequence.generate(ids, tokens, sampler, stops, on_prefill=mark))
    else:
        out = list(speculative.generate(sequence, ids, tokens, sampler, stops, proposer, pace.most, stats, mark, pace))
    return (len(out) - 1) / (time.perf_counter() - prefilled[0]), out


def bench(model, proposer, most: int, tokens: int, repeat: int) -> None:
    print(f"{'task':<40} {'tokens':>6} {'plain tok/s':>12} {'speculative':>12} {'ratio':>6} {'accepted':>9}")
    for name, text in TASKS.items():
        ids = chat_tokens(model.tokenizer, [{"role": "user", "content": text}])
        plain, spec, stats, pace = [], [], speculative.Stats(), speculative.Pace(most)
        sequences = [CachedSequence(model, len(ids) + tokens + 16) for _ in range(2)]
        for r in range(repeat + 1):
            rate, want = decode_rate(model, sequences[0], ids, tokens)
            round_stats = speculative.Stats()
            fast, got = decode_rate(model, sequences[1], ids, tokens, proposer, pace, round_stats)
            if got != want:
                raise AssertionError(f"{name}: speculative decoding changed the reply")
            if r:  # the first round captures and warms up
                plain.append(rate)
                spec.append(fast)
                for field in ("passes", "drafted", "accepted"):
                    setattr(stats, field, getattr(stats, field) + getattr(round_stats, field))
        p, s = statistics.median(plain), statistics.median(spec)
        rate = stats.accepted / stats.drafted if stats.drafted else 0.0
        print(f"{name:<40} {len(want):>6} {p:>12.1f} {s:>12.1f} {s / p:>6.2f} {rate:>8.0%} "
              f"({stats.drafted} drafted in {stats.passes} passes)", flush=True)
