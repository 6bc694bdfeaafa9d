"""Turning a conversation into prompt tokens with the model's own format: Llama 3's header
tokens for Llama 3 tokenizers, or the checkpoint's Jinja chat template (e.g. ChatML for SmolLM2),
rendered the way transformers' apply_chat_template renders it."""
import bisect
import re
import secrets
from datetime import datetime
from functools import lru_cache

from tinytensor.errors import UserError


def llama3_tokens(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Meta's ChatFormat: <|begin_of_text|>, then per message a header
    <|start_header_id|>role<|end_header_id|>\\n\\n, the stripped content and <|eot_id|>."""
    sp = tokenizer.special

    def header(role):
        return [sp["<|start_header_id|>"], *tokenizer.encode(role), sp["<|end_header_id|>"],
                *tokenizer.encode("\n\n")]

    def content(c):  # a string, or parts: {"type": "image"} is the <|image|> token
        if isinstance(c, str):
            return tokenizer.encode(c.strip())
        return [i for part in c for i in
                ([sp["<|image|>"]] if part["type"] == "image" else tokenizer.encode(part["text"].strip()))]

    ids = [tokenizer.bos_id]
    for m in messages:
        ids += header(m["role"]) + content(m["content"]) + [sp["<|eot_id|>"]]
    return ids + (header("assistant") if add_generation_prompt else [])


class ChatTemplateError(UserError, ValueError):
    """A checkpoint's chat template that failed or exceeded its bounds; one line."""


MAX_RENDER_CHARS = 1 << 20  # a template's own text beyond the messages': real ones write a few KB


@lru_cache(maxsize=1)
def _sandbox_class():
    """transformers' sandbox, with the operators that can build a huge string or number in one
    step (`'A' * 2000000000`, `x + x` doubling in a loop, `9 ** 9 ** 9`) refused past the
    environment's `limit` characters (or 4096 bits). Made on first use: jinja2 is imported only
    when a template is rendered."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})
        limit = MAX_RENDER_CHARS

        def call_binop(self, context, operator, left, right):
            if operator == "**" and _is_int(left) and _is_int(right) and right > 0 \
                    and right * max(abs(left), 1).bit_length() > 4096:
                raise TemplateError("the template computes a number of more than 4096 bits")
            if operator in ("*", "+") and _result_length(operator, left, right) > self.limit:
                raise TemplateError(f"the template builds a string or list of more than {self.limit} items")
            return super().call_binop(context, operator, left, right)
    return Sandbox


def _sandbox(limit: int):
    """A sandbox with transformers' settings and globals, bounded at `limit` characters."""
    from jinja2.exceptions import TemplateError

    def raise_exception(message):
        raise TemplateError(message)

    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True)
    env.limit = limit
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _result_length(operator: str, left, right) -> int:
    sized = (str, list, tuple)
    if operator == "+":
        return len(left) + len(right) if isinstance(left, sized) and isinstance(right, sized) else 0
    if isinstance(left, sized) and _is_int(right):
        return len(left) * right
    return len(right) * left if isinstance(right, sized) and _is_int(left) else 0


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    """A Jinja chat template, in the sandbox and with the settings transformers uses. What it
    writes is bounded: twice the messages' own length plus MAX_RENDER_CHARS. Any failure is a
    ChatTemplateError of one line."""
    from jinja2.exceptions import TemplateError

    limit = MAX_RENDER_CHARS + 2 * sum(map(len, _texts(messages)))
    out, size = [], 0
    try:
        for piece in _sandbox(limit).from_string(template).generate(
                messages=messages, add_generation_prompt=add_generation_prompt, **special):
            size += len(piece)
            if size > limit:
                raise TemplateError(f"it wrote more than {limit} characters")
            out.append(piece)
    except Exception as e:  # noqa: BLE001: a checkpoint's template can fail in any of Python's ways
        said = " ".join(str(e).split())
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}{': ' + said if said else ''}") from None
    return "".join(out)


def _texts(messages: list[dict]) -> list[str]:
    """The text a conversation's messages carry: string contents and text parts, in order."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out


def _with_texts(messages: list[dict], texts) -> list[dict]:
    """messages with their texts (as _texts lists them) replaced, in order."""
    texts = iter(texts)
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            content = next(texts)
        elif isinstance(content, list):
            content = [{**p, "text": next(texts)} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                       for p in content]
        out.append({**m, "content": content})
    return out


def render_pieces(template: str, messages: list[dict], add_generation_prompt: bool = True,
                  **special) -> tuple[list[tuple[str, bool]], bool]:
    """The rendered prompt as (text, written by the template) pieces, so that control tokens are
    read only in the template's own text, never in what a user wrote; and whether the messages'
    texts were found. They are found by rendering a second time with each text replaced by a
    marker that cannot occur in it (a random nonce) and checking that putting the texts (as
    they are, or stripped as Llama 3's templates strip them) back in place of the markers gives
    exactly the first rendering. When it does not (the template rewrote a text), the whole
    rendering comes back as one piece, with False."""
    rendered = render_template(template, messages, add_generation_prompt, **special)
    texts = _texts(messages)
    if not texts:
        return [(rendered, True)], True
    nonce = secrets.token_hex(8)
    marker = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
    marked = render_template(template, _with_texts(messages, (f"\ue000{nonce}:{k}\ue001" for k in range(len(texts)))),
                             add_generation_prompt, **special)
    parts = marker.split(marked)  # template text, text index, template text, ...
    for form in (lambda t: t, str.strip):
        pieces = [(part, True) if k % 2 == 0 else (form(texts[int(part)]), False) for k, part in enumerate(parts)]
        if "".join(text for text, _ in pieces) == rendered:
            return [p for p in pieces if p[0]], True
    return [(rendered, True)], False


def check_chat_format(tokenizer) -> None:
    """ValueError unless chat_tokens can format a conversation for this tokenizer: a chat
    template, or Llama 3's header tokens for Meta's format."""
    if tokenizer.chat_template is None and "<|start_header_id|>" not in tokenizer.special:
        raise ValueError("this tokenizer has no chat format (neither a chat template nor Llama 3's header tokens): "
                         "give the text as a plain completion prompt instead")


def chat_tokens(tokenizer, messages: list[dict], render=render_pieces, tools: list[dict] | None = None) -> list[int]:
    """The prompt for the assistant's next turn: the checkpoint's template, else Meta's format.
    Control tokens come only from the template's own text: a message that contains
    `<|eot_id|>` or `<|im_start|>` gets those characters as plain text, so no one can forge a
    turn or a role from inside a message. render: render_pieces, or a stand-in with its
    signature (the server's renders in a child process, with a time and memory bound). tools:
    OpenAI's tool objects, for a template that renders them (models/text/tool_calls.py)."""
    check_chat_format(tokenizer)
    if tokenizer.chat_template is None:
        return llama3_tokens(tokenizer, messages)
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    special = {k: tokenizer.decode([i]) for k, i in names.items() if i is not None}
    if tools is not None:
        special["tools"] = tools
    pieces, found = render(tokenizer.chat_template, messages, True, **special)
    text = "".join(piece for piece, _ in pieces)
    if not found:
        forged = next((name for name in tokenizer.special for t in _texts(messages) if name in t), None)
        if forged is not None:
            raise ValueError(f"a message contains the control token {forged}, and this chat template rewrites "
                             f"messages, so it cannot be kept as plain text: remove it from the message")
        return tokenizer.encode(text, bos=False, allow_special=True)
    starts, ends, at = [], [], 0  # the template's own pieces, as character ranges of text
    for piece, own in pieces:
        if own:
            starts.append(at)
            ends.append(at + len(piece))
        at += len(piece)

    def in_template(start: int, end: int) -> bool:
        k = bisect.bisect_right(starts, start) - 1
        return k >= 0 and end <= ends[k]
    return tokenizer.encode(text, bos=False, allow_special=in_template)


def has_chat_format(tokenizer) -> bool:
    """A chat template from the checkpoint, or a Llama 3 tokenizer of an Instruct model."""
    return tokenizer.chat_template is not None or getattr(tokenizer, "instruct", False)
