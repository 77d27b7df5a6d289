"""OpenAI's tool calling on chat completions, as vLLM serves it: the request's tool definitions and tool_choice, the
JSON schema that named and "required" choices constrain the output to (vLLM's `_get_json_schema_from_tool`), the
tool calls an assistant message carries (answers, and history sent back), and the plan one request follows. Plain
data and JSON; no tensors."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from server.engine.sampling_params import StructuredOutput

FUNCTION_NAME = "^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


def _function_name(v: str) -> str:
    if not re.fullmatch(FUNCTION_NAME, v):
        raise ValueError(f"a function name is 1 to 64 letters, digits, '_' or '-' (OpenAI's rule), got {v[:80]!r}")
    return v


TOOL_PARSERS = ("hermes",)  # `painters serve --tool-call-parser`
WORKING_CHOICES = '"none", "required" or a named function ({"type": "function", "function": {"name": ...}})'
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}  # a function that declares none (vLLM's)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, AfterValidator(_function_name)] = Field(
        description="letters, digits, _ and -, at most 64 (OpenAI's rule)",
        json_schema_extra={"pattern": FUNCTION_NAME})
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments (an object)")
    strict: bool | None = Field(None, description="accepted; arguments always follow the schema strictly when the "
                                "output is constrained (named or required tool_choice)")


class ChatTool(BaseModel):
    """One entry of `tools`: OpenAI's function tool."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str


class NamedToolChoice(BaseModel):
    """tool_choice naming one function: the answer is a call to it."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


# -- tool calls in messages -------------------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SentToolCall(ToolCall):
    """A tool call in a request's history (an assistant message's tool_calls): its arguments must be JSON text, which
    the chat template is given as an object (vLLM's `_postprocess_messages`, transformers' convention)."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("function")
    @classmethod
    def _arguments_are_json(cls, v: FunctionCall) -> FunctionCall:
        if v.arguments:
            try:
                json.loads(v.arguments)
            except json.JSONDecodeError as e:
                raise ValueError(f"function.arguments must be JSON text (the call's arguments), got "
                                 f"{v.arguments[:40]!r}: {e}") from None
        return v

    def for_template(self) -> dict[str, Any]:
        """The call as chat templates read it: arguments as an object ({} when empty)."""
        args = json.loads(self.function.arguments) if self.function.arguments else {}
        return {"id": self.id, "type": self.type, "function": {"name": self.function.name, "arguments": args}}


class DeltaFunctionCall(BaseModel):
    name: str | None = Field(None, exclude_if=lambda v: v is None)
    arguments: str | None = Field(None, exclude_if=lambda v: v is None)


class DeltaToolCall(BaseModel):
    """A streamed piece of a tool call: the first of each call carries its id, type and name (and any arguments so
    far), the later ones more argument text; `index` says which call of the choice (the openai client joins by it)."""

    index: int
    id: str | None = Field(None, exclude_if=lambda v: v is None)
    type: Literal["function"] | None = Field(None, exclude_if=lambda v: v is None)
    function: DeltaFunctionCall


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's make_tool_call_id


# -- what a request asks for -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request treats tools: 'none' (plain content), 'named' (the output is that function's arguments),
    'required' (a JSON array of calls) or 'auto' (the model's own call format, read by `parser`)."""

    mode: Literal["none", "named", "required", "auto"]
    tools: tuple[ChatTool, ...] = ()
    name: str | None = None  # named: the function
    parser: str | None = None  # auto: the --tool-call-parser
    single: bool = False  # parallel_tool_calls false: only the first call is answered (vLLM's filter)

    @property
    def structured(self) -> StructuredOutput | None:
        """The constraint the output follows (named, required), through the structured-output path."""
        if self.mode == "named":
            return StructuredOutput("json", json.dumps(_parameters(self._tool(self.name))), param="tool_choice")
        if self.mode == "required":
            return StructuredOutput("json", json.dumps(required_schema(self.tools)), param="tool_choice")
        return None

    def _tool(self, name: str | None) -> ChatTool:
        return next(t for t in self.tools if t.function.name == name)


def plan(tools: list[ChatTool] | None, choice: ToolChoice | None, *, parser: str | None,
         parallel: bool | None = None) -> ToolPlan:
    """The request's tools and tool_choice (already checked against each other: `check_choice`) and the server's
    tool-call parser -> its plan. OpenAI's default choice is "auto" when tools are given, else "none"; "auto" needs
    the server started with a parser, as vLLM's needs --enable-auto-tool-choice --tool-call-parser."""
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none" or not tools:
        return ToolPlan("none")
    single = parallel is False
    if isinstance(choice, NamedToolChoice):
        return ToolPlan("named", tuple(tools), name=choice.function.name)
    if choice == "required":
        return ToolPlan("required", tuple(tools), single=single)
    if parser is None:
        raise ValueError('tool_choice "auto" (the default when tools are given) needs the server started with '
                         f"--tool-call-parser ({', '.join(TOOL_PARSERS)}); this one was not. Send tool_choice "
                         f"{WORKING_CHOICES}")
    return ToolPlan("auto", tuple(tools), parser=parser, single=single)


def check_tools(tools: list[ChatTool] | None) -> list[ChatTool] | None:
    names = [t.function.name for t in tools or ()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"function names must be unique within tools; {', '.join(twice)} "
                         f"{'is' if len(twice) == 1 else 'are'} given more than once")
    for t in tools or ():
        params = t.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise ValueError(f"function {t.function.name}: parameters must be a JSON schema of an object "
                             f"(type 'object'), got type {params.get('type')!r}")
    return tools


def check_choice(tools: list[ChatTool] | None, choice: ToolChoice | None) -> None:
    """tool_choice against the tools it chooses among."""
    if choice is None or choice == "none":
        return
    if tools is None:
        raise ValueError(f"{_shown(choice)} needs tools (the functions the model may call); send tools "
                         "or leave tool_choice out")
    if isinstance(choice, NamedToolChoice):
        names = [t.function.name for t in tools]
        if choice.function.name not in names:
            raise ValueError(f"names the function {choice.function.name!r}, which is not among tools ("
                             f"{', '.join(names) or 'none given'}); name one of them")


def check_one_constraint(choice: ToolChoice | None, *, structured: str | None) -> None:
    """A named or required choice is a structured output of its own: not beside another (`structured`: the field
    that asks for one)."""
    if structured is not None and (isinstance(choice, NamedToolChoice) or choice == "required"):
        raise ValueError(f"tool_choice {_shown(choice)} constrains the output to tool calls, and {structured} "
                         "constrains it too; send one of them")


def check_ends_at_call(choice: ToolChoice | None, *, ignore_eos: bool) -> None:
    """A named or required choice's answer is its calls' JSON, which ends where its grammar does; ignore_eos decodes
    on past that end, unconstrained, and the arguments would be that JSON followed by whatever came next (vLLM hands
    the whole text over as the arguments: broken JSON). Refused, as a call cannot be both."""
    if ignore_eos and (isinstance(choice, NamedToolChoice) or choice == "required"):
        raise ValueError(f"tool_choice {_shown(choice)} ends the answer where its calls' JSON ends, and ignore_eos "
                         "would decode on past it, breaking the arguments' JSON; leave ignore_eos out (or send "
                         'tool_choice "none" or "auto")')


def _shown(choice: ToolChoice) -> str:
    return f"{{function: {choice.function.name}}}" if isinstance(choice, NamedToolChoice) else json.dumps(choice)


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else EMPTY_PARAMETERS


def required_schema(tools: tuple[ChatTool, ...]) -> dict[str, Any]:
    """vLLM's schema for tool_choice "required": a JSON array of at least one {"name", "parameters"} call, each
    valid against its function; the functions' $defs are lifted to the top (a name defined twice differently is
    refused), as vLLM's `_get_json_schema_from_tool` does."""
    defs: dict[str, Any] = {}
    calls = []
    for tool in tools:
        params = dict(_parameters(tool))
        for name, schema in params.pop("$defs", {}).items():
            if name in defs and defs[name] != schema:
                raise ValueError(f"the $defs entry {name!r} is defined differently by two tools; tool_choice "
                                 "'required' puts every tool in one schema, so rename one")
            defs[name] = schema
        calls.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                     "parameters": params},
                      "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    if defs:
        schema["$defs"] = defs
    return schema
