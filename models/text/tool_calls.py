"""Tool (function) calls, as OpenAI's chat API defines them, for the model's own chat format:
the tools put in the prompt, the JSON Schema a call must match (for constrained decoding), and
a reply read back as text or as calls.

Two ways, chosen by the checkpoint's template:
- "llama3": a Llama 3.1/3.2 template that takes `tools` renders them itself (Meta's wording:
  "respond with a JSON for a function call ... {"name": function name, "parameters": ...}"),
  and the model answers one call as {"name": ..., "parameters": {...}}, perhaps after
  <|python_tag|>.
- "generic": any other chat format (ChatML, Meta's header format without a template...): the
  tools are described in the system message, and the reply is JSON, {"tool_call": {"name",
  "arguments"}} (or {"tool_calls": [...]} when parallel calls are allowed) or {"response":
  text}, always kept to that shape by the grammar, as llama-server's generic format does.

tool_choice "required" or a named function is enforced by the grammar in both ways; "auto" in
the llama3 way leaves the model free and reads a call out of the reply when it is one.
"""
import json
import re
from dataclasses import dataclass

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
MAX_TOOLS = 128
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolError(ValueError):
    """A request's tools, tool_choice or tool messages that cannot be used: one line."""


@dataclass
class Tools:
    functions: dict        # name -> {"description": str, "parameters": JSON Schema}
    choice: str            # "auto", "required", or a function's name (then only it)
    parallel: bool         # may one reply make several calls (the generic way only)
    style: str             # "llama3" or "generic"

    # ---- the prompt -------------------------------------------------------------------------------
    def messages(self, messages: list[dict]) -> list[dict]:
        """The conversation as the chat format takes it: in the generic way, the tools described
        in the system message, earlier calls and tool results as JSON text."""
        if self.style == "llama3":
            return messages
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in m["tool_calls"]]
                reply = {"tool_calls": calls} if self.parallel else {"tool_call": calls[0]}
                m = {"role": "assistant", "content": json.dumps(reply)}
            elif m["role"] == "tool":
                m = {"role": "tool", "content": m["content"]}
            out.append(m)
        if out and out[0]["role"] == "system":
            return [{"role": "system", "content": out[0]["content"] + "\n\n" + self._described()}] + out[1:]
        return [{"role": "system", "content": self._described()}] + out

    def template_tools(self) -> list[dict] | None:
        """What a template that takes `tools` gets (OpenAI's tool objects), in the llama3 way."""
        if self.style != "llama3":
            return None
        return [{"type": "function", "function": {"name": name, **f}} for name, f in self.functions.items()]

    def _described(self) -> str:
        listed = "\n".join(json.dumps({"name": name, **f}) for name, f in self.functions.items())
        shape = ('{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}, ...]}' if self.parallel
                 else '{"tool_call": {"name": "<function name>", "arguments": {<its arguments>}}}')
        answer = "" if self.choice != "auto" else ', or {"response": "<your reply to the user>"} to answer without one'
        return (f"You can call these functions:\n{listed}\n\nReply in JSON: {shape} to call "
                f"{'them' if self.parallel else 'one'}{answer}.")

    # ---- what a reply must match ------------------------------------------------------------------
    def schema(self) -> dict | None:
        """The JSON Schema of a reply, for the grammar; None where the model is free (llama3, auto)."""
        names = list(self.functions) if self.choice in ("auto", "required") else [self.choice]
        key = "parameters" if self.style == "llama3" else "arguments"
        calls = [{"type": "object", "properties": {"name": {"const": n}, key: self.functions[n]["parameters"]},
                  "required": ["name", key], "additionalProperties": False} for n in names]
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.style == "llama3":
            return None if self.choice == "auto" else call
        made = ({"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
                 "required": ["tool_calls"], "additionalProperties": False} if self.parallel else
                {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"],
                 "additionalProperties": False})
        if self.choice != "auto":
            return made
        return {"anyOf": [made, {"type": "object", "properties": {"response": {"type": "string"}},
                                 "required": ["response"], "additionalProperties": False}]}

    # ---- the reply, read back ---------------------------------------------------------------------
    def may_be_call(self, text: str) -> bool:
        """Whether a reply beginning with this text may still become a call (then it is held
        back, not streamed as content)."""
        head = text.lstrip()
        return self.style == "generic" or head == "" or head.startswith(("{", "<|python_tag|>"))

    def read(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, calls): calls as (name, arguments as JSON text); content None when there
        are calls. A reply that is not a call (or was cut short) is content, as it came."""
        try:
            reply = json.loads(text.strip().removeprefix("<|python_tag|>"))
        except ValueError:
            return text, []
        if not isinstance(reply, dict):
            return text, []
        if self.style == "llama3":
            found = [reply]
            key = "parameters" if "parameters" in reply else "arguments"
        else:
            if isinstance(reply.get("response"), str):
                return reply["response"], []
            found = reply.get("tool_calls") if "tool_calls" in reply else [reply.get("tool_call")]
            key = "arguments"
        def is_call(c) -> bool:
            return isinstance(c, dict) and c.get("name") in self.functions and isinstance(c.get(key), dict)
        if not isinstance(found, list) or not all(map(is_call, found)):
            return text, []
        return None, [{"name": c["name"], "arguments": json.dumps(c[key])} for c in found]


def read_tools(body: dict, template: str | None, special: dict) -> Tools | None:
    """A chat request's tools, tool_choice and parallel_tool_calls, checked; None without tools
    or with tool_choice "none". template: the checkpoint's chat template (None: Meta's header
    format); special: the tokenizer's control-token names, which the llama3 way refuses inside a
    tool's definition (the template writes it as its own text, where control tokens are read)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls must be true or false")
    if tools is None:
        if choice not in (None, "none"):
            raise ToolError("tool_choice needs tools: give the functions the model may call")
        return None
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise ToolError(f"tools must be a list of 1 to {MAX_TOOLS} {{type: function, function: {{name, description, "
                        f"parameters}}}} objects")
    functions = {}
    for t in tools:
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise ToolError("each tool must be {type: function, function: {name, description, parameters}}")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"a function's name must be 1 to 64 letters, digits, _ or -, got {name!r}")
        if name in functions:
            raise ToolError(f"two tools are named {name!r}")
        parameters = f.get("parameters", EMPTY_PARAMETERS)
        description = f.get("description", "")
        if not isinstance(parameters, dict) or not isinstance(description, str):
            raise ToolError(f"function {name!r}: parameters must be a JSON Schema object and description a string")
        functions[name] = {"description": description, "parameters": parameters}
    if choice is None or choice == "auto":
        choice = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        pass
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
        if choice not in functions:
            raise ToolError(f"tool_choice names {choice!r}, which is not among the tools")
    else:
        raise ToolError('tool_choice must be "auto", "none", "required" or {type: function, function: {name}}')
    style = "llama3" if template and "tools" in template and "<|start_header_id|>" in template else "generic"
    made = Tools(functions, choice, parallel, style)
    if style == "llama3":
        text = json.dumps(made.template_tools(), ensure_ascii=False)
        forged = next((s for s in special if s in text), None)
        if forged is not None:
            raise ToolError(f"a tool's definition contains the control token {forged}: remove it")
    return made


def read_tool_messages(messages: list[dict], raw: list[dict], special: dict) -> list[dict]:
    """messages (role and text content) with what the raw messages add for tools: an assistant
    message's tool_calls (arguments parsed: templates write them with tojson), a tool message's
    tool_call_id. Arguments that are not a JSON object, or that hold a control token, are refused."""
    out = []
    for m, r in zip(messages, raw):
        m = dict(m)
        calls = r.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise ToolError("tool_calls belong to assistant messages, as a list")
            m["tool_calls"] = []
            for c in calls:
                f = c.get("function") if isinstance(c, dict) else None
                if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)):
                    raise ToolError("each tool call must be {id, type: function, function: {name, arguments}}")
                try:
                    arguments = json.loads(f["arguments"])
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):
                    raise ToolError(f"the arguments of a call to {f['name']!r} must be a JSON object, as text")
                forged = next((s for s in special if s in f["arguments"] or s in f["name"]), None)
                if forged is not None:
                    raise ToolError(f"a tool call contains the control token {forged}: remove it")
                m["tool_calls"].append({"id": str(c.get("id", "")), "type": "function",
                                        "function": {"name": f["name"], "arguments": arguments}})
        if m["role"] == "tool":
            if not isinstance(r.get("tool_call_id", ""), str):
                raise ToolError("a tool message's tool_call_id must be a string")
            m["tool_call_id"] = r.get("tool_call_id", "")
        out.append(m)
    return out
