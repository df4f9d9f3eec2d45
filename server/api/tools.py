"""Tool calls: what ``tools`` and ``tool_choice`` ask of a model, and how its output becomes ``tool_calls``.

- ``tool_choice`` naming a function: the arguments are generated under the function's JSON schema, so they
  always parse; the answer is that one call.
- ``required``: one call, generated under a schema that is any of ``{"name": <a tool>, "arguments": <its
  parameters>}``.
- ``auto`` (the default with tools): the model's own chat template renders the tools, and the parser for the
  template's tool-call format turns the output into calls: Hermes-style ``<tool_call>{...}</tool_call>`` or
  Llama-3's bare JSON ``{"name": ..., "parameters": ...}``. A template that renders no tools cannot do this
  (400).
- ``none``: the tools are left out and the model answers in text.

When a template renders no tools, a forced call tells the model about its function in a system message.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from server.api.protocol import NamedToolChoice, Tool
from server.engine.structured import Constraint

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def template_parser(tokenizer) -> str | None:
    """The tool-call format a chat template asks its model for; None when the template renders no tools."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "tools" not in template:
        return None
    if "<tool_call>" in template:
        return HERMES
    return LLAMA3_JSON


def parameters(tool: Tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "named" | "required"
    tools: list[Tool]
    name: str | None = None  # the named function
    parser: str | None = None  # auto: the template's format

    @staticmethod
    def of(tools: list[Tool] | None, choice, tokenizer) -> "ToolPlan":
        """Raises ValueError (a 400) when ``auto`` meets a template with no tool support."""
        tools = tools or []
        if not tools or choice == "none":
            return ToolPlan("none", [])
        if isinstance(choice, NamedToolChoice):
            return ToolPlan("named", tools, choice.function.name, template_parser(tokenizer))
        if choice == "required":
            return ToolPlan("required", tools, None, template_parser(tokenizer))
        parser = template_parser(tokenizer)
        if parser is None:
            raise ValueError("this model's chat template does not render tools, so it cannot choose to call one "
                             "(tool_choice auto); name a function in tool_choice, or use required")
        return ToolPlan("auto", tools, None, parser)

    @property
    def forced(self) -> bool:
        return self.mode in ("named", "required")

    def constraint(self) -> Constraint | None:
        if self.mode == "named":
            return Constraint.json_schema(parameters(self._tool(self.name)))
        if self.mode == "required":
            return Constraint.json_schema({"anyOf": [
                {"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": parameters(t)},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]})
        return None

    def _tool(self, name: str) -> Tool:
        return next(t for t in self.tools if t.function.name == name)

    def template_tools(self) -> list[dict] | None:
        """What the chat template renders: the tools, when it renders them and the model may call them."""
        if self.mode == "none" or self.parser is None:
            return None
        offered = self.tools if self.mode != "named" else [self._tool(self.name)]
        return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in offered]

    def hint(self) -> str | None:
        """For a forced call on a template that renders no tools: the function(s), told in a system message."""
        if not self.forced or self.parser is not None:
            return None
        offered = self.tools if self.mode == "required" else [self._tool(self.name)]
        lines = [f"- {t.function.name}: {t.function.description or 'no description'}; parameters: "
                 f"{json.dumps(parameters(t))}" for t in offered]
        if self.mode == "named":
            return f"Call the function {self.name}. Reply with its arguments as a JSON object.\n" + "\n".join(lines)
        return ('Call one of these functions. Reply with {"name": ..., "arguments": {...}}.\n' + "\n".join(lines))

    # -- output
    def calls(self, text: str) -> tuple[str | None, list[dict]]:
        """The model's text -> (content, tool calls). Forced modes always give one call; ``auto`` gives the calls
        it finds and the text around them as content (None when there is none)."""
        if self.mode == "named":
            return None, [self.make_call(self.name, text)]
        if self.mode == "required":
            try:
                value = json.loads(text)
                return None, [self.make_call(value["name"], json.dumps(value["arguments"]))]
            except (ValueError, KeyError, TypeError):  # cut short by max_tokens: what there is, as content
                return text, []
        if self.mode != "auto":
            return text, []
        return parse_calls(text, self.parser, {t.function.name for t in self.tools})

    @staticmethod
    def make_call(name: str, arguments: str) -> dict:
        return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _as_call(value, names: set[str]) -> dict | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ToolPlan.make_call(value["name"], json.dumps(arguments))


def parse_calls(text: str, parser: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """Calls in a model's text, in the template's format; text that is not a call stays content."""
    calls: list[dict] = []
    if parser == HERMES and "<tool_call>" in text:
        for m in _HERMES_CALL.finditer(text):
            try:
                call = _as_call(json.loads(m.group(1)), names)
            except ValueError:
                call = None
            if call is not None:
                calls.append(call)
        content = _HERMES_CALL.sub("", text).strip() if calls else text
        return (content or None) if calls else text, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if body.startswith(("{", "[")):
        try:
            value = json.loads(body)
        except ValueError:
            # Llama-3 may put several calls on one line separated by ";"
            parts = [p for p in body.split(";") if p.strip()]
            try:
                value = [json.loads(p) for p in parts]
            except ValueError:
                return text, []
        values = value if isinstance(value, list) else [value]
        calls = [c for c in (_as_call(v, names) for v in values) if c is not None]
        if calls and len(calls) == len(values):
            return None, calls
    return text, []


def could_be_call(text: str, parser: str) -> bool:
    """Whether output that begins with ``text`` may still turn out to be a tool call (a stream holds it back)."""
    head = text.lstrip()
    if not head:
        return True
    openers = ["<tool_call>"] if parser == HERMES else ["{", "[", "<|python_tag|>"]
    return any(head.startswith(o) or o.startswith(head) for o in openers)
