"""The OpenAI API's request fields checked and turned into what the engine takes, and the
engine's tokens turned into its response objects. No HTTP here (tools/server/app.py does that).

A field this server does not implement is a 400 naming it (an application that sends
`tools` must not get plain text as if it had been heard), except the ones
OpenAI's API defines as hints or bookkeeping (`user`, `metadata`, `store`...), which change no
token. A field it uses with the wrong type or out of range is a 400 with a message naming it.
"""
import base64
import json
import time
import uuid

from models.generation.constraints import Grammar, GrammarError
from models.generation.sampling import RULES, check_logit_bias
from models.text.tool_calls import ToolError, Tools, read_tool_messages, read_tools

SETTINGS = tuple(RULES)  # the sampler's settings, each a request field
COMMON_FIELDS = {"model", "max_tokens", "max_completion_tokens", "n", "stop", "seed", "stream", "stream_options",
                 "logprobs", "logit_bias", "ignore_eos", "json_schema", "grammar", *SETTINGS}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "top_logprobs", "response_format", "tools", "tool_choice",
                               "parallel_tool_calls", "prediction"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions"}
MAX_INPUTS = 256  # embeddings per request
# OpenAI's hints and bookkeeping (and llama-server's cache_prompt: this server always reuses a
# cached prefix): accepted, changing no token
HINTS = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "cache_prompt"}
MAX_BIASES = 1024
# images a chat request may hold: the encoder takes minutes an image on a CPU (the 11B's 4 tiles
# are 6,400 positions), and each adds as many keys to every cross layer's attention
MAX_IMAGES = 4
MAX_IMAGE_BYTES = 10 << 20  # an image file (decoded from base64); the request body holds 16 MiB
MAX_CHOICES = 16  # n: choices per prompt
# A schema's or grammar's characters: compiling one costs time on the server's threads growing
# faster than its size (10,000 properties: ~10 s), so it is bounded. 64 KiB holds ~2,000
# properties (~0.4 s); OpenAI's structured outputs take at most 5,000.
MAX_GRAMMAR_CHARS = 1 << 16


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_body(message: str, kind: str = "invalid_request_error", param=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _number(body, name, lo=None, hi=None, whole=False, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        raise BadRequest(f"{name} must be {'an integer' if whole else 'a number'}, got {value!r}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"{name} is {value}: it must be in [{lo}, {hi}]" if hi is not None
                         else f"{name} is {value}: it must be >= {lo}", name)
    return value


def flag(body, name) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {value!r}", name)
    return value


def refuse_unknown(body: dict, fields: set) -> None:
    """A 400 for the first field (by name) this endpoint does not implement, and for a best_of
    other than the one that asks for nothing."""
    for name in sorted(body):
        if name not in fields and name not in HINTS:
            raise BadRequest(f"{name} is not supported by this server: leave it out (fields it would ignore are "
                             f"refused, not dropped)", name)
    if body.get("best_of") not in (None, 1):
        raise BadRequest("best_of must be 1: this server returns the choices it generates", "best_of")


def sampling(body: dict, defaults: dict, vocab_size: int) -> dict:
    """make_sampler's settings: the request's, else the server's defaults (the checkpoint's
    generation_config.json, else llama.cpp's), and its logit_bias."""
    settings = dict(defaults)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > MAX_BIASES:
            raise BadRequest(f"logit_bias must be an object of at most {MAX_BIASES} token ids (as strings) to "
                             f"numbers in [-100, 100]", "logit_bias")
        try:
            settings["logit_bias"] = check_logit_bias(bias, vocab_size)
        except ValueError as e:
            raise BadRequest(str(e), "logit_bias") from None
    for name in SETTINGS:
        if body.get(name) is not None:
            value = _number(body, name, whole=name == "top_k")
            if not RULES[name][0](value):
                raise BadRequest(f"{name} is {value}: it must be {RULES[name][1]}", name)
            settings[name] = value
    if "top_k" in settings and settings["top_k"] < 0:  # some clients send -1 for "all"
        settings["top_k"] = 0
    return settings


def reply_grammar(body: dict) -> Grammar | None:
    """What the reply must match: OpenAI's response_format (json_object; json_schema with its
    json_schema.schema), or llama-server's json_schema (a schema) and grammar (GBNF). One of
    them at most."""
    given = [name for name in ("response_format", "json_schema", "grammar") if body.get(name) is not None]
    if len(given) > 1:
        raise BadRequest(f"give one of {' and '.join(given)}: a reply has one shape", given[1])
    if given:
        check_grammar_size(body[given[0]], given[0])
    try:
        if body.get("grammar") is not None:
            if not isinstance(body["grammar"], str):
                raise BadRequest("grammar must be a string of GBNF rules (root ::= ...)", "grammar")
            return Grammar.gbnf(body["grammar"])
        if body.get("json_schema") is not None:
            return Grammar.json_schema(body["json_schema"])
        return _response_format(body.get("response_format"))
    except GrammarError as e:
        raise BadRequest(str(e), given[0]) from None


def check_grammar_size(value, field: str) -> None:
    size = len(value) if isinstance(value, str) else len(json.dumps(value))
    if size > MAX_GRAMMAR_CHARS:
        raise BadRequest(f"the {field} has {size} characters: this server compiles at most {MAX_GRAMMAR_CHARS}",
                         field)


def _response_format(value) -> Grammar | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":  # llama-server lets it carry a schema too
        return Grammar.json_object() if value.get("schema") is None else Grammar.json_schema(value["schema"])
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise BadRequest("response_format json_schema needs json_schema: {name, schema}", "response_format")
        return Grammar.json_object() if spec.get("schema") is None else Grammar.json_schema(spec["schema"])
    raise BadRequest(f"response_format type {kind!r}: give text, json_object or json_schema", "response_format")


def common(body: dict) -> dict:
    """The fields both endpoints share."""
    n = _number(body, "n", lo=1, hi=MAX_CHOICES, whole=True, default=1)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise BadRequest("stop must be a non-empty string or a list of at most 16 of them", "stop")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed < 2**64):
        raise BadRequest(f"seed must be an integer in [0, 2**64) or -1 (a random seed, as llama-server's), "
                         f"got {seed!r}", "seed")
    seed = None if seed == -1 else seed
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    return {"max_tokens": _number(body, name, lo=1, whole=True), "stop": stop, "seed": seed, "n": n,
            "grammar": reply_grammar(body),
            "stream": flag(body, "stream"), "include_usage": bool(options.get("include_usage")),
            "ignore_eos": flag(body, "ignore_eos")}  # llama-server's and vLLM's: generate max_tokens


def check_fits(texts: list[str], field: str, context: int, longest_token: int) -> None:
    """Text that cannot fit the context whatever its tokens is refused before it is tokenized
    (a 16 MB prompt would hold a tokenizer for minutes): no token is longer than the
    vocabulary's longest, so more bytes than context x that cannot fit."""
    size = sum(len(t.encode("utf-8", errors="replace")) for t in texts)
    if size > context * longest_token:
        raise BadRequest(f"the {field} has {size} bytes of text, more than the context of {context} tokens can "
                         f"hold (a token here is at most {longest_token} bytes)", field)


def completion_prompts(body: dict, tokenizer, context: int, longest_token: int) -> list[list[int]]:
    """/v1/completions' prompt: a string, a list of strings, a list of token ids, or a list of
    lists of them; each is one prompt (one choice)."""
    return token_lists(body.get("prompt"), "prompt", tokenizer, context, longest_token)


def token_lists(value, field: str, tokenizer, context: int, longest_token: int, most: int | None = None):
    """A string, a list of strings, a list of token ids, or a list of lists of them (at most
    `most`), as lists of token ids. Strings get the BOS as the tokenizer adds it, once
    check_fits has passed them all."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(is_id(i) for i in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{field} must be a string, a list of strings, a list of token ids or a list of such "
                         f"lists", field)
    if most is not None and len(value) > most:
        raise BadRequest(f"{field} holds {len(value)} inputs: at most {most} per request", field)
    check_fits([p for p in value if isinstance(p, str)], field, context, longest_token)
    out = []
    for p in value:
        if isinstance(p, str):
            out.append(tokenizer.encode(p, bos=bool(getattr(tokenizer, "add_bos", True))))
        elif isinstance(p, list) and p and all(is_id(i) for i in p):
            out.append(list(p))
        else:
            raise BadRequest(f"each {field} must be a string or a non-empty list of token ids", field)
    return out


def embedding_format(body: dict, dim: int) -> str:
    """/v1/embeddings' encoding_format ("float", or "base64": the float32 bytes, little-endian,
    as the openai client asks by default), and its dimensions, which must be the model's."""
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest(f"encoding_format {fmt!r}: give float or base64", "encoding_format")
    dimensions = _number(body, "dimensions", lo=1, whole=True)
    if dimensions is not None and dimensions != dim:
        raise BadRequest(f"dimensions is {dimensions}: this model's embeddings have {dim} (they are not shortened)",
                         "dimensions")
    return fmt


def embeddings_response(vectors, fmt: str, model: str, tokens: int) -> dict:
    """OpenAI's list of embedding objects."""
    def value(v):
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if fmt == "base64" else v.tolist()
    return {"object": "list", "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": value(v)} for i, v in enumerate(vectors)]}


def is_id(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool)


def chat_messages(body: dict) -> tuple[list[dict], list[bytes]]:
    """/v1/chat/completions' messages as models.text.chat takes them: role and content, a string
    (text parts joined), or for a message with images its parts, each image an {"type": "image"}
    part where it stood; and the images' bytes, in order (image_url parts with data: URLs)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out, images = [], []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message must be an object with a role and content", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    if m["role"] != "user":
                        raise BadRequest(f"a {m['role']} message holds an image: images go in user messages",
                                         "messages")
                    images.append(image_bytes(part.get("image_url")))
                    parts.append({"type": "image"})
                elif kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise BadRequest(f"content parts of type {kind!r} are not supported: send text and image_url "
                                     f"parts", "messages")
            text_only = all(p["type"] == "text" for p in parts)
            content = "".join(p["text"] for p in parts) if text_only else parts
        if content is None:
            content = ""
        if not isinstance(content, (str, list)):
            raise BadRequest("a message's content must be a string or a list of text and image_url parts", "messages")
        out.append({"role": m["role"], "content": content})
    if len(images) > MAX_IMAGES:
        raise BadRequest(f"the messages hold {len(images)} images: this server takes at most {MAX_IMAGES} a request "
                         f"(each is encoded on its own, thousands of positions for the cross layers)", "messages")
    return out, images


def image_bytes(value) -> bytes:
    """An image_url part's image: a data: URL with base64 content (the server fetches nothing)."""
    url = value.get("url") if isinstance(value, dict) else None
    if not isinstance(url, str):
        raise BadRequest("an image_url part needs image_url: {url: \"data:image/png;base64,...\"}", "messages")
    if value.get("detail", "auto") not in ("auto", None):
        raise BadRequest(f"image_url detail {value['detail']!r}: this model sees every image at its own tile size; "
                         f"leave detail out or give auto", "messages")
    head, comma, data = url.partition(",")
    if not head.lower().startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if ":" in url else "no scheme"
        raise BadRequest(f"image_url is a {scheme} URL: this server never fetches one; send the image itself as a "
                         f"data: URL (data:image/png;base64,...)", "messages")
    if not comma or not head.lower().endswith(";base64"):
        raise BadRequest("an image's data: URL must be base64 (data:image/png;base64,...)", "messages")
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise BadRequest(f"an image is larger than {MAX_IMAGE_BYTES >> 20} MiB: send a smaller one", "messages")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise BadRequest("an image's data: URL is not valid base64", "messages") from None


def chat_tools(body: dict, messages: list[dict], tokenizer) -> Tools | None:
    """The request's tools (None without them, or with tool_choice none), and the tool calls and
    results in its messages added to messages (in place)."""
    if body.get("tools") is not None:
        check_grammar_size(body["tools"], "tools")
    try:
        messages[:] = read_tool_messages(messages, body["messages"], tokenizer.special)
        return read_tools(body, tokenizer.chat_template, tokenizer.special)
    except ToolError as e:
        raise BadRequest(str(e), "tools") from None


def message_texts(messages: list[dict], tools: Tools | None) -> list[str]:
    """The text a conversation brings to the prompt, to bound it before it is tokenized."""
    texts = [m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"])
             for m in messages]
    texts += [json.dumps(c["function"]) for m in messages for c in m.get("tool_calls", [])]
    return texts + ([json.dumps(tools.template_tools())] if tools and tools.template_tools() else [])


def logprobs_wanted(body: dict, chat: bool) -> int | None:
    """How many top tokens to list per position, or None for no log-probabilities."""
    if chat:
        if not flag(body, "logprobs"):
            return None
        return _number(body, "top_logprobs", lo=0, hi=20, whole=True, default=0)
    return _number(body, "logprobs", lo=0, hi=20, whole=True)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int, requests=()) -> dict:
    """OpenAI's usage object; with the engine's requests, what speculative decoding drafted for
    them, as OpenAI counts predicted outputs: tokens of drafts kept and of drafts not kept."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    drafted, accepted = sum(r.drafted for r in requests), sum(r.accepted for r in requests)
    if drafted or any(r.prediction for r in requests):
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
    return out


def prediction(body: dict, tokenizer, context: int, longest_token: int) -> list[int]:
    """OpenAI's predicted output ({type: content, content: text or text parts}) as token ids."""
    value = body.get("prediction")
    if value is None:
        return []
    content = value.get("content") if isinstance(value, dict) and value.get("type") == "content" else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest("prediction must be {type: content, content: text or text parts}", "prediction")
    check_fits([content], "prediction", context, longest_token)
    return tokenizer.encode(content, bos=False)


def chat_logprob(tokenizer, token) -> dict:
    """One position of a chat completion's logprobs.content."""
    def entry(i, lp):
        raw = tokenizer.token_bytes(i)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}
    return {**entry(token.id, token.logprob), "top_logprobs": [entry(i, lp) for i, lp in token.top]}


class CompletionLogprobs:
    """A completion's logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer, self.offset = tokenizer, offset
        self.value = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token_id: int, logprob, top) -> None:
        text = self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
        v = self.value
        v["tokens"].append(text)
        v["token_logprobs"].append(logprob)
        v["top_logprobs"].append(None if logprob is None else
                                 {self.tokenizer.token_bytes(i).decode("utf-8", errors="replace"): lp for i, lp in top})
        v["text_offset"].append(self.offset)
        self.offset += len(text)
