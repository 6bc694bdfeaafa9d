"""What constrained decoding costs per token, on SmolLM2's 49k vocabulary and Llama 3's 128k:

    python -m tools.bench_constraints [--repeat 20]

For each schema, a valid reply (json.dumps of a sample document) is walked token by token as
a decode would walk it: the grammar's mask for the next token, applied to a row of logits, the
greedy draw and the step. Medians and the slowest step, in milliseconds, beside the same greedy
draw without a constraint (what the sampler costs anyway). The model's own step is not counted:
it is the same with or without a constraint.
"""
import argparse
import json
import statistics
import time

import numpy as np

from models.formats.assets import fetch
from models.formats.checkpoint import load_tokenizer
from models.generation.constraints import Grammar
from models.generation.sampling import make_sampler

CASES = {  # name -> (schema, a document valid for it)
    "object": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                 "email": {"type": "string", "format": "email"}},
                "required": ["name", "age"]},
               {"name": "Ann Lee from the north of the country", "age": 42, "email": "ann@example.com"}),
    "nested": ({"$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                    "tags": {"type": "array", "items": {"type": "string"}}},
                                   "required": ["id", "tags"]}},
                "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
                                                 "total": {"type": "number"}}, "required": ["items", "total"]},
               {"items": [{"id": i, "tags": ["red", "green blue", "x"]} for i in range(4)], "total": 12.5}),
    "any JSON": ({"type": "object"}, {"a": [1, 2.5, None, True], "b": {"c": "text with spaces", "d": []}}),
}


def measure(tokenizer, schema, document, repeat: int) -> dict:
    stops = sorted(tokenizer.stop_ids)
    ids = tokenizer.encode(json.dumps(document), bos=False)
    logits = np.random.default_rng(0).normal(0, 1, tokenizer.vocab_size).astype(np.float32)
    grammar = Grammar.json_schema(schema)
    grammar.start(tokenizer, stops)  # the vocabulary's one-time preparation, not timed here
    constrained, plain = [], []
    for _ in range(repeat):
        constraint = grammar.start(tokenizer, stops)
        for token in ids:
            row = logits.copy()
            row[token] = 100.0  # the "model" wants the document's next token: greedy takes it
            start = time.perf_counter()
            constraint.mask(row)
            drawn = int(np.argmax(row))
            constraint.advance(drawn)
            constrained.append(time.perf_counter() - start)
        greedy = make_sampler(temperature=0)
        for token in ids:
            row = logits.copy()
            row[token] = 100.0
            start = time.perf_counter()
            greedy(row, [])
            plain.append(time.perf_counter() - start)
    return {"tokens": len(ids), "median": statistics.median(constrained), "max": max(constrained),
            "sampler": statistics.median(plain)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.bench_constraints", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=20, help="walks of each document (default: 20)")
    args = p.parse_args(argv)
    print("| vocabulary | schema | tokens | mask + draw + step, median ms | slowest ms | greedy draw alone, median ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, asset in (("SmolLM2, 49,152", "smollm2-135m"), ("Llama 3, 128,256", "llama3-tokenizer")):
        tokenizer = load_tokenizer(fetch(asset))
        for case, (schema, document) in CASES.items():
            r = measure(tokenizer, schema, document, args.repeat)
            print(f"| {name} | {case} | {r['tokens']} | {r['median'] * 1e3:.3f} | {r['max'] * 1e3:.2f} | "
                  f"{r['sampler'] * 1e3:.3f} |", flush=True)


if __name__ == "__main__":
    main()
