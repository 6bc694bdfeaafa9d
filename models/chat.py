"""Turning a conversation into prompt tokens with the model's own format: Llama 3's header
tokens for Llama 3 tokenizers, or the checkpoint's Jinja chat template (e.g. ChatML for SmolLM2),
rendered the way transformers' apply_chat_template renders it."""
from datetime import datetime


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


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    """A Jinja chat template, in the sandbox and with the settings transformers uses."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special)


def check_chat_format(tokenizer) -> None:
    """ValueError unless chat_tokens can format a conversation for this tokenizer: a chat
    template, or Llama 3's header tokens for Meta's format."""
    if tokenizer.chat_template is None and "<|start_header_id|>" not in tokenizer.special:
        raise ValueError("this tokenizer has no chat format (neither a chat template nor Llama 3's header tokens): "
                         "give the text as a plain completion prompt instead")


def chat_tokens(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt for the assistant's next turn: the checkpoint's template, else Meta's format."""
    check_chat_format(tokenizer)
    if tokenizer.chat_template is None:
        return llama3_tokens(tokenizer, messages)
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    special = {k: tokenizer.decode([i]) for k, i in names.items() if i is not None}
    text = render_template(tokenizer.chat_template, messages, **special)
    return tokenizer.encode(text, bos=False, allow_special=True)


def has_chat_format(tokenizer) -> bool:
    """A chat template from the checkpoint, or a Llama 3 tokenizer of an Instruct model."""
    return tokenizer.chat_template is not None or getattr(tokenizer, "instruct", False)
