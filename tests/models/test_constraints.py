"""Constrained decoding (models/generation/constraints.py) on the two real vocabularies: SmolLM2's
49k GPT-2-style BPE and Llama 3's 128k tiktoken.

Random logits stand in for a model: whatever the scores, every reply drawn under a JSON Schema
must parse and validate (the `jsonschema` package is the oracle), every reply under a grammar must
match it, and the stop tokens are allowed exactly where the reply is complete."""
import json
import re

import numpy as np
import pytest

from models.formats.checkpoint import load_tokenizer
from models.generation.constraints import Grammar, GrammarError
from models.generation.sampling import make_sampler

jsonschema = pytest.importorskip("jsonschema", reason="the jsonschema oracle is a test dependency: pip install -e '.[test]'")

SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                                "member": {"type": "boolean"}},
               "required": ["name", "age"], "additionalProperties": False},
    "array_enum_null": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "note": {"type": ["string", "null"], "maxLength": 8}},
        "required": ["tags", "note"], "additionalProperties": False},
    "any_of_numbers": {"anyOf": [{"type": "number", "minimum": -10, "maximum": 10},
                                 {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                                  "required": ["x"], "additionalProperties": False}]},
    "refs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                                                  "y": {"type": "integer", "minimum": -99, "maximum": 99}},
                                 "required": ["x", "y"], "additionalProperties": False}},
             "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
             "required": ["from", "to"], "additionalProperties": False},
}
GBNF = 'root ::= answer "."\nanswer ::= ("yes" | "no") (", " reason)?\nreason ::= [a-z]{1,10}'
GBNF_MATCH = re.compile(r"(yes|no)(, [a-z]{1,10})?\.")


@pytest.fixture(scope="module", params=["smollm2", "llama3"])
def tokenizer(request, smollm2_path, llama3_tokenizer_path):
    return load_tokenizer(smollm2_path if request.param == "smollm2" else llama3_tokenizer_path)


def draw(tokenizer, grammar: Grammar, seed: int, most: int = 200) -> tuple[str, bool]:
    """A reply drawn under the grammar from random logits: (its text, whether it ended with a
    stop token)."""
    rng = np.random.default_rng(seed)
    stops = frozenset(tokenizer.stop_ids)
    sample = make_sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                          constraint=grammar.start(tokenizer, stops))
    ids = []
    for _ in range(most):
        token = sample(rng.normal(0, 3, tokenizer.vocab_size).astype(np.float32), ids)
        if token in stops:
            return tokenizer.decode(ids), True
        ids.append(token)
    return tokenizer.decode(ids), False


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_reply_drawn_under_a_schema_validates(tokenizer, name):
    schema = SCHEMAS[name]
    grammar = Grammar.json_schema(schema)
    for seed in range(6):
        text, ended = draw(tokenizer, grammar, seed)
        assert ended, text
        jsonschema.validate(json.loads(text), schema)


def test_any_json_object_parses(tokenizer):
    for seed in range(4):
        text, ended = draw(tokenizer, Grammar.json_object(), seed, most=400)
        if ended:  # an object's values may nest without end under random scores
            assert isinstance(json.loads(text), dict), text
        else:
            assert text.startswith("{")


def test_every_reply_drawn_under_a_grammar_matches_it(tokenizer):
    grammar = Grammar.gbnf(GBNF)
    replies = {draw(tokenizer, grammar, seed) for seed in range(8)}
    for text, ended in replies:
        assert ended and GBNF_MATCH.fullmatch(text), text
    assert len(replies) > 1  # the scores choose among what the grammar allows


def test_stop_tokens_are_allowed_exactly_where_the_reply_is_complete(tokenizer):
    """A valid reply's own tokens are each allowed; a stop token only after the last of them;
    a token that breaks the JSON never."""
    stops = sorted(tokenizer.stop_ids)
    schema = SCHEMAS["object"]
    text = json.dumps({"name": "Ann Lee", "age": 42, "member": True})  # the separators JSON_LAYOUT asks for
    constraint = Grammar.json_schema(schema).start(tokenizer, stops)
    ids = tokenizer.encode(text, bos=False)
    for i, token in enumerate(ids):
        allowed = constraint.allowed(tokenizer.vocab_size)
        assert allowed[token], (i, tokenizer.decode(ids[:i]))
        assert not allowed[stops].any(), f"a stop token after {tokenizer.decode(ids[:i])!r}"
        constraint.advance(token)
    allowed = constraint.allowed(tokenizer.vocab_size + 7)  # ids past the vocabulary: never
    assert allowed[stops].all() and allowed.sum() == len(stops) and not allowed[tokenizer.vocab_size:].any()
    fresh = Grammar.json_schema(schema).start(tokenizer, stops)
    (brace,) = tokenizer.encode("}", bos=False)
    assert not fresh.allowed(tokenizer.vocab_size)[brace]
    with pytest.raises(RuntimeError, match="not allowed"):
        fresh.advance(brace)


def test_the_mask_keeps_greedy_where_the_model_agrees(tokenizer):
    """Greedy under a constraint takes the best allowed token: where the best token is allowed it
    is the unconstrained choice; where it is not, the best of the allowed ones."""
    stops = sorted(tokenizer.stop_ids)
    (open_brace,) = tokenizer.encode("{", bos=False)
    (letter,) = tokenizer.encode("Z", bos=False)
    logits = np.zeros(tokenizer.vocab_size, np.float32)
    logits[open_brace] = 5.0
    assert make_sampler(temperature=0, constraint=Grammar.json_object().start(tokenizer, stops))(logits, []) == open_brace
    logits[letter] = 9.0
    assert make_sampler(temperature=0)(logits, []) == letter
    assert make_sampler(temperature=0, constraint=Grammar.json_object().start(tokenizer, stops))(logits, []) == open_brace


def test_a_reset_constraint_starts_the_grammar_again(tokenizer):
    stops = sorted(tokenizer.stop_ids)
    constraint = Grammar.gbnf(GBNF).start(tokenizer, stops)
    first = constraint.allowed(tokenizer.vocab_size).copy()
    for token in tokenizer.encode("yes.", bos=False):
        constraint.advance(token)
    assert not np.array_equal(constraint.allowed(tokenizer.vocab_size), first)
    constraint.reset()
    assert np.array_equal(constraint.allowed(tokenizer.vocab_size), first)


@pytest.mark.parametrize("make, says", [
    (lambda: Grammar.json_schema('{"type": "object"'), "not valid JSON"),
    (lambda: Grammar.json_schema([1, 2]), "is an object"),
    (lambda: Grammar.json_schema({"type": "objec"}), "Invalid type"),
    (lambda: Grammar.json_schema({"properties": {"a": {"$ref": "#/$defs/missing"}}}), "does not exist"),
    (lambda: Grammar.json_schema({"type": "string", "pattern": "(("}), "unclosed group"),
    (lambda: Grammar.gbnf("root ::= missing"), "'missing' not found"),
    (lambda: Grammar.gbnf("  "), "empty"),
])
def test_a_bad_schema_or_grammar_is_one_line(make, says):
    with pytest.raises(GrammarError, match=re.escape(says)) as e:
        make()
    assert "\n" not in str(e.value)


def test_a_constrained_reply_needs_a_stop_token(tokenizer):
    with pytest.raises(GrammarError, match="stop token"):
        Grammar.json_object().start(tokenizer, ())


def test_logit_bias_that_bans_every_allowed_token_is_an_error(tokenizer):
    stops = sorted(tokenizer.stop_ids)
    constraint = Grammar.gbnf('root ::= "{"').start(tokenizer, stops)
    (brace,) = tokenizer.encode("{", bos=False)
    sample = make_sampler(temperature=0, logit_bias={brace: -100}, constraint=constraint)
    with pytest.raises(RuntimeError, match="bans every token"):
        sample(np.zeros(tokenizer.vocab_size, np.float32), [])


def test_an_object_of_many_optional_properties_is_written_whole(tokenizer):
    """1,000 optional properties (past the engine's default row limit, which fails such an
    object partway through): a document with some of them, in order, walks to its end."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1000)},
              "additionalProperties": False}
    document = {f"p{i}": i for i in (3, 500, 999)}
    constraint = Grammar.json_schema(schema).start(tokenizer, tokenizer.stop_ids)
    for token in tokenizer.encode(json.dumps(document), bos=False):
        assert constraint.allowed(tokenizer.vocab_size)[token]
        constraint.advance(token)
    assert constraint.allowed(tokenizer.vocab_size)[sorted(tokenizer.stop_ids)].all()
