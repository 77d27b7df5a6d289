"""Reading tool calls out of a chat answer's text, whole (`parse`) or as it streams (`stream_reader`), for each
`ToolPlan` mode, as vLLM's serving_chat.py and hermes_tool_parser.py do:

- named: the text is the function's arguments (JSON, constrained by its schema); content "".
- required: the text is a JSON array of {"name", "parameters"}; each entry is a call, its arguments the raw JSON text
  of its parameters (streamed as generated, so the streamed and whole answers agree); content "".
- auto, parser "hermes": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen, SmolLM3
  style); content is the text before the first block (null when empty); text whose blocks do not parse is content.
  Streamed, the content before a block streams as it comes, and the calls come whole when the answer ends.

Plain text and JSON; no tensors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from server.api.tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, ToolPlan, new_tool_call_id

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)  # vLLM's tool_call_regex


@dataclass
class Parsed:
    """A whole answer: its content and the calls it made."""

    content: str | None
    calls: list[ToolCall]
    complete: bool = True  # the calls' text ended (required: its array closed; a stop string may cut it first)


@dataclass
class Delta:
    """What one streamed step adds: content text and/or pieces of tool calls."""

    content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


def parse(plan: ToolPlan, text: str) -> Parsed:
    parsed = _parse(plan, text)
    if plan.single:
        parsed.calls = parsed.calls[:1]
    return parsed


def _parse(plan: ToolPlan, text: str) -> Parsed:
    if plan.mode == "named":
        assert plan.name is not None
        return Parsed("", [ToolCall(id=new_tool_call_id(), function=FunctionCall(name=plan.name, arguments=text))])
    if plan.mode == "required":
        reader = RequiredCalls()
        reader.feed(text)
        return Parsed("", [ToolCall(id=new_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                           for c in reader.calls if c.name is not None], complete=reader.closed)
    if plan.mode == "auto":
        content, calls = hermes_calls(text)
        return Parsed(content, [ToolCall(id=new_tool_call_id(), function=f) for f in calls])
    return Parsed(text, [])


def finish_reason(plan: ToolPlan, engine_reason: str | None, *, called: bool) -> str | None:
    """OpenAI's: "tool_calls" where the model chose to call (required, auto) and stopped of itself; a named call
    keeps the engine's reason ("stop"), as in vLLM. called: calls were made and their text is whole (a stop string
    that cut a required array leaves "stop": its last arguments are not JSON)."""
    if called and plan.mode in ("required", "auto") and engine_reason == "stop":
        return "tool_calls"
    return engine_reason


# -- required: a JSON array of {"name", "parameters"} -----------------------------------------------------------------


@dataclass
class _Call:
    name: str | None = None
    arguments: str = ""  # the raw JSON text of its parameters, so far
    sent: int = -1  # streamed: -1 before its first piece, then how much of `arguments` went out


class RequiredCalls:
    """Reads a JSON array of call objects a character at a time (the grammar makes it valid JSON as far as it goes):
    each object's "name", and the raw text of its "parameters" value as it grows."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self._depth = 0  # containers open; a call object is depth 2
        self._in_string = self._escape = False
        self._buf = ""  # a string at depth 2 (a key or the name), raw
        self._key: str | None = None
        self._after_colon = False
        self._capturing = False  # inside a call's "parameters" value
        self._opened = False  # the array began

    @property
    def closed(self) -> bool:
        """Whether the array began and ended."""
        return self._opened and self._depth == 0

    def feed(self, text: str) -> None:
        for c in text:
            if self._capturing and self._capture(c):
                continue
            self._structure(c)

    def _capture(self, c: str) -> bool:
        """One character of a parameters value; False when it ended the value and is structure of the call."""
        call = self.calls[-1]
        if self._in_string:
            call.arguments += c
            if self._closes_string(c):
                self._capturing = self._depth > 2
            return True
        if not call.arguments and c.isspace():
            return True
        if c == '"':
            self._in_string = True
        elif c in "{[":
            self._depth += 1
        elif c in "}]" and self._depth > 2:
            self._depth -= 1
            self._capturing = self._depth > 2
        elif self._depth == 2 and c in ",}]":  # a scalar ended by the call object's own structure
            self._capturing = False
            return False
        call.arguments += c
        return True

    def _structure(self, c: str) -> None:
        if self._in_string:
            if self._closes_string(c):
                self._string_done()
            else:
                self._buf += c
            return
        if c == '"':
            self._in_string, self._buf = True, ""
        elif c in "{[":
            self._depth += 1
            self._opened = True
            if self._depth == 2:
                self.calls.append(_Call())
                self._key, self._after_colon = None, False
        elif c in "}]":
            self._depth -= 1
        elif self._depth == 2 and c == ":":
            self._after_colon = True
            self._capturing = self._key == "parameters"
        elif self._depth == 2 and c == ",":
            self._after_colon = False

    def _closes_string(self, c: str) -> bool:
        """One character inside a string (escapes followed): whether it is the closing quote."""
        if self._escape:
            self._escape = False
        elif c == "\\":
            self._escape = True
        elif c == '"':
            self._in_string = False
            return True
        return False

    def _string_done(self) -> None:
        if self._depth != 2:
            return
        text = json.loads(f'"{self._buf}"')
        if not self._after_colon:
            self._key = text
        elif self._key == "name":
            self.calls[-1].name = text
        self._after_colon = False


# -- hermes: <tool_call>{"name": ..., "arguments": ...}</tool_call> ---------------------------------------------------


def hermes_calls(text: str) -> tuple[str | None, list[FunctionCall]]:
    """vLLM's Hermes2ProToolParser.extract_tool_calls: the calls, and the content before the first; text with no
    block, or a block that is not a call, is all content."""
    if HERMES_START not in text:
        return text, []
    try:
        raw = [json.loads(a or b) for a, b in HERMES_CALL.findall(text)]
        calls = [FunctionCall(name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False)) for c in raw]
    except (ValueError, KeyError, TypeError):
        return text, []
    content = text[:text.find(HERMES_START)]
    return content or None, calls


# -- streams -----------------------------------------------------------------------------------------------------------


class StreamReader:
    """One choice's stream under its plan: `feed` each step's text, and `finished` on the last."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.called = False  # a tool call went out
        self._text = ""
        self._sent = 0  # content characters sent (hermes)
        self._named = _Call(name=plan.name)
        self._required = RequiredCalls()

    @property
    def complete(self) -> bool:
        """Whether the calls' text is whole so far (`Parsed.complete`)."""
        return self.plan.mode != "required" or self._required.closed

    def feed(self, text: str, *, finished: bool) -> Delta:
        self._text += text
        if self.plan.mode == "named":
            self._named.arguments += text
            out = Delta(tool_calls=_pieces([self._named], flush=finished))
        elif self.plan.mode == "required":
            self._required.feed(text)
            out = Delta(tool_calls=_pieces(self._required.calls, flush=finished))
        else:
            out = self._hermes(finished)
        if self.plan.single:
            out.tool_calls = [t for t in out.tool_calls if t.index == 0]
        self.called = self.called or bool(out.tool_calls)
        return out

    def _hermes(self, finished: bool) -> Delta:
        start = self._text.find(HERMES_START)
        if not finished:  # content up to a block (or to what may begin one); the blocks wait for the end
            end = start if start >= 0 else len(self._text) - _partial_tail(self._text, HERMES_START)
            return self._content(end)
        content, calls = hermes_calls(self._text)
        if not calls:
            return self._content(len(self._text))
        return Delta(content=self._content(len(content or "")).content,
                     tool_calls=[DeltaToolCall(index=i, id=new_tool_call_id(), type="function",
                                               function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
                                 for i, c in enumerate(calls)])

    def _content(self, end: int) -> Delta:
        piece = self._text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return Delta(content=piece or None)


def stream_reader(plan: ToolPlan) -> StreamReader:
    return StreamReader(plan)


def _pieces(calls: list[_Call], *, flush: bool) -> list[DeltaToolCall]:
    """The new pieces of `calls`: a call's first once its arguments begin (or at the end, `flush`), with id, type
    and name; then whatever its arguments grew by. `index` counts calls within the choice, as OpenAI's client joins
    them (vLLM's named stream writes the choice's index there, which breaks n > 1)."""
    out = []
    for i, call in enumerate(calls):
        if call.name is None:
            continue
        if call.sent < 0 and (call.arguments or flush):
            out.append(DeltaToolCall(index=i, id=new_tool_call_id(), type="function",
                                     function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
        elif call.sent >= 0 and len(call.arguments) > call.sent:
            out.append(DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=call.arguments[call.sent:])))
        else:
            continue
        call.sent = len(call.arguments)
    return out


def _partial_tail(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (held back until it is known)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
