"""Constrained decoding: a reply kept to a JSON Schema, to any JSON object, or to a grammar
(GBNF as llama.cpp writes it, or Lark), by setting to -inf at each step the logit of every token
that could not continue it. The sampler draws from what is left, so the reply parses, and it can
end (a stop token) only where the grammar is complete.

The grammar engine is llguidance (Microsoft's, MIT): the one llama.cpp, vLLM, SGLang and OpenAI's
own structured outputs use. It lexes and parses on bytes and walks the vocabulary's token trie once
per step in native code: about 20 us per token on the 128k Llama 3 vocabulary here (docs/server.md),
where a Python walk of the same trie costs tens of milliseconds. It covers the JSON Schema subset
OpenAI's structured outputs and llama.cpp's json_schema_to_grammar accept, and more; its wheel has
no dependencies and ships for x86-64 and aarch64.

    grammar = Grammar.json_schema(schema)    # or json_object(), gbnf(text) (GBNF or Lark)
    constraint = grammar.start(tokenizer, stop_ids)   # one per reply (GrammarError: one line)
    constraint.mask(logits)                  # each step, before the draw
    constraint.advance(token)                # after it
"""
import json
import weakref

import numpy as np

from tinytensor.errors import UserError

# Replies keep JSON's usual separators (json.dumps' own) and no other whitespace: a small model
# that may put any whitespace anywhere can fill max_tokens with newlines. A schema's
# "x-guidance" object overrides these (llguidance's options).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# llguidance's limits, but for the items of one parser row: an object's optional properties take
# ~4 each, and its default (2,000) fails objects of 500+ properties partway through a reply. A
# step's work stays bounded by its other limits (~15 ms at most, measured at 2,000 properties).
ROW_ITEMS = 10_000


class GrammarError(UserError, ValueError):
    """A schema or grammar that cannot constrain a reply: what is wrong, in one line."""


def _engine():
    try:
        import llguidance
    except ImportError:  # a dependency of the package: only a broken install lacks it
        raise GrammarError("constrained decoding needs the llguidance package: pip install llguidance") from None
    return llguidance


class Grammar:
    """What a reply must match, as llguidance's grammar text; compiled per vocabulary by start."""

    def __init__(self, text: str, what: str):
        """text: llguidance's grammar; checked here, before any vocabulary is at hand (a rule
        referred to but missing, a regex the lexer refuses, an unsupported schema keyword)."""
        problem = _engine().LLMatcher.validate_grammar(text, limits=_limits())
        if problem:
            raise GrammarError(f"{what} cannot be used: {_line(problem)}")
        self.text, self.what = text, what

    @classmethod
    def json_schema(cls, schema) -> "Grammar":
        """schema: a dict, or its JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema is an object (or true/false), not {type(schema).__name__}")
        try:
            text = _engine().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"the JSON schema cannot be used: {_line(e)}") from None
        return cls(text, "the JSON schema")

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's response_format json_object)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def gbnf(cls, text: str) -> "Grammar":
        """A grammar in llama.cpp's GBNF (its `root` rule is the reply); Lark text is taken too."""
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("the grammar is empty: give GBNF rules, starting with root ::= ...")
        try:
            text = _engine().grammar_from("gbnf", text)
        except ValueError as e:
            raise GrammarError(f"the grammar cannot be read: {_line(e)}") from None
        return cls(text, "the grammar")

    def start(self, tokenizer, stop_ids) -> "Constraint":
        """A fresh constraint for one reply. stop_ids: the tokens that end it; they are
        allowed where the grammar is complete, and only there."""
        if not stop_ids:  # a constrained reply ends with a stop token where its grammar is complete
            raise GrammarError(f"{self.what} needs a stop token to end the reply: leave out ignore_eos")
        vocabulary = _vocabulary(tokenizer, frozenset(stop_ids))
        matcher = _engine().LLMatcher(vocabulary, self.text, log_level=0, limits=_limits())
        if matcher.is_error():
            raise GrammarError(f"{self.what} cannot be used: {_line(matcher.get_error())}")
        return Constraint(matcher, vocabulary.vocab_size)


class Constraint:
    """One reply's place in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.bits = np.zeros((vocab_size + 31) // 32, np.int32)  # llguidance's mask: bit i = token i allowed

    def allowed(self, n: int) -> np.ndarray:
        """Whether each of n token ids may come next (ids past the vocabulary may not)."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if self.matcher.is_error():
            raise RuntimeError(f"constrained decoding failed: {self.matcher.get_error()}")
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little").view(bool)  # 0/1 bytes, as bools
        return allowed[:n] if n <= allowed.size else np.pad(allowed, (0, n - allowed.size))

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits with -inf for every token the grammar does not allow next (in place)."""
        allowed = self.allowed(logits.size)
        if not allowed.any():
            raise RuntimeError("constrained decoding failed: the grammar allows no token here")
        logits[~allowed] = -np.inf
        return logits

    def reset(self) -> None:
        """Back to the grammar's start, for the next reply (a CLI chat's turns)."""
        self.matcher.reset()

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"constrained decoding failed: token {token} was not allowed "
                               f"({self.matcher.get_error()})")


# llguidance's view of a vocabulary (~0.1-0.4 s to build): once per tokenizer and set of stop tokens
_vocabularies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer, stop_ids: frozenset):
    known = _vocabularies.setdefault(tokenizer, {})
    if stop_ids not in known:
        known[stop_ids] = _build_vocabulary(tokenizer, stop_ids)
    return known[stop_ids]


def _build_vocabulary(tokenizer, stop_ids: frozenset):
    llg = _engine()
    special = set(tokenizer.special.values())

    class View:  # what llguidance.TokenizerWrapper reads
        eos_token_id = min(stop_ids)
        bos_token_id = tokenizer.bos_id
        special_token_ids = sorted(special)
        # special tokens' text is marked with a leading 0xFF byte, as llguidance expects, so
        # that grammar text never matches "<|eot_id|>" spelled out as a special token
        tokens = [b"\xff" + tokenizer.token_bytes(i) if i in special else tokenizer.token_bytes(i)
                  for i in range(tokenizer.vocab_size)]

        def __call__(self, text):
            text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
            return tokenizer.encode(text, bos=False)
    return llg.LLTokenizer(llg.TokenizerWrapper(View()), n_vocab=tokenizer.vocab_size,
                           eos_token=sorted(stop_ids))


def _limits():
    return _engine().LLParserLimits(max_items_in_row=ROW_ITEMS)


def _line(error) -> str:
    """An engine's message as one line."""
    return " ".join(str(error).split())
