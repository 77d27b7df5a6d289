"""Reading tool calls out of a chat answer's text, whole (`parse`) or as it streams (`stream_reader`), for each
`ToolPlan` mode, as vLLM's serving_chat.py and hermes_tool_parser.py do:

- named: the text is the function's arguments (JSON, constrained by its schema); content "".
- required: the text is a JSON array of {"name", "parameters"}; each entry is a call, its arguments the raw JSON text
  of its parameters (streamed as generated, so the streamed and whole answers agree); content "".
- auto, parser "hermes": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen, SmolLM3
  style); content is the text before the first block (null when empty); an answer whose first block is not a call
  is content. Streamed, the content streams up to a block, and each call as it is written: its name, then its
  arguments (`HermesCalls` says how, and where it parts from vLLM).

Plain text and JSON; no tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from server.api.partial_json import PartialJson
from server.api.tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, ToolPlan, new_tool_call_id

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"


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
        reader = HermesCalls()
        reader.feed(text, finished=True)
        calls = reader.calls[:1] if plan.single else reader.calls
        return Parsed((reader.content or None) if calls else reader.content,
                      [ToolCall(id=new_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                       for c in calls if c.name is not None], complete=all(c.whole for c in calls))
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
    whole: bool = False  # hermes: its arguments' JSON ended


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


class HermesCalls:
    """Reads `<tool_call>` blocks as they stream (vLLM's Hermes2ProToolParser.extract_tool_calls_streaming), and a
    whole answer the same way, so that the streamed and whole answers agree however the text came in pieces:

    - Content is the text before the first `<tool_call>` (a tail that may begin one waits for the next piece).
    - A block is the text up to `</tool_call>` (or to the end), read as JSON (`PartialJson`). Its call begins once
      its "name" is whole, a non-empty string of printable characters; the "arguments" value streams from then on, as far as it is certain,
      in json.dumps' text (what vLLM's whole answer writes: `json.dumps(arguments, ensure_ascii=False)`). An object
      that closes without "arguments" has "{}" (vLLM's stream).
    - A first block that turns out not to be a call before its name is read (not JSON, not an object, no name) makes
      the whole answer content, markup and all, as vLLM's whole answer does; once a call has gone out, such a block
      is passed over.
    - A call whose arguments break off (the answer cut by max_tokens or a stop string, or text that stops being
      JSON) keeps its name and the arguments as far as they were written, and is not `whole`: finish_reason is then
      the engine's ("length"), not "tool_calls". vLLM's stream keeps such a call too, but closes its arguments with
      text the model never wrote (partial_json_parser's completion) and says "tool_calls"; its whole answer drops
      the call and makes everything content. Ours say the same streamed or not.
    - Text between and after blocks is not content (vLLM's whole answer reads only the blocks)."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.content = ""  # so far
        self._text = ""  # all of the answer so far
        self._held = ""  # the end of the text, which may begin a marker
        self._mode: Literal["content", "block", "between", "content only"] = "content"
        self._block = PartialJson()  # the block being read
        self._call: _Call | None = None  # its call, once named

    def feed(self, text: str, *, finished: bool) -> None:
        self._text += text
        if self._mode == "content only":
            self.content += text
            return
        rest, self._held = self._held + text, ""
        while self._mode != "content only":
            marker = HERMES_END if self._mode == "block" else HERMES_START
            at = rest.find(marker)
            if at < 0:
                keep = 0 if finished else _partial_tail(rest, marker)
                self._held = rest[len(rest) - keep:]
                self._read(rest[:len(rest) - keep])
                break
            self._read(rest[:at])
            rest = rest[at + len(marker):]
            if self._mode == "block":
                self._block_ends()
            elif self._mode != "content only":
                self._mode, self._block, self._call = "block", PartialJson(), None
        if finished and self._mode == "block":
            self._block_ends()
        if self._mode == "content only":
            self.content = self._text

    def _read(self, text: str) -> None:
        if self._mode == "content":
            self.content += text
        elif self._mode == "block":
            self._block.feed(text)
            self._follow()

    def _follow(self) -> None:
        """The block's call, as far as the block has been read."""
        block = self._block
        if self._call is None:
            name = block.members.get("name")
            if name is not None and name.whole:  # read before anything broke: reading stops at a break
                value = json.loads(name.text)
                if not (isinstance(value, str) and value and value.isprintable()):  # (a lone \ud800: no UTF-8)
                    self._not_a_call()
                    return
                self._call = _Call(name=value)
                self.calls.append(self._call)
            elif block.broken:
                self._not_a_call()
                return
            else:
                return
        arguments = block.members.get("arguments")
        if arguments is not None:
            self._call.arguments, self._call.whole = arguments.text, arguments.whole

    def _block_ends(self) -> None:
        self._block.end()
        self._follow()
        if self._mode != "block":
            return
        if self._call is None:
            self._not_a_call()
        elif "arguments" not in self._block.members and self._block.whole:
            self._call.arguments, self._call.whole = "{}", True
        if self._mode == "block":
            self._mode = "between"

    def _not_a_call(self) -> None:
        if not self.calls:  # vLLM's fallback: the whole answer is content
            self._mode = "content only"


# -- streams -----------------------------------------------------------------------------------------------------------


class StreamReader:
    """One choice's stream under its plan: `feed` each step's text, and `finished` on the last."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.called = False  # a tool call went out
        self._sent = 0  # content characters sent (hermes)
        self._named = _Call(name=plan.name)
        self._required = RequiredCalls()
        self._hermes = HermesCalls()

    @property
    def complete(self) -> bool:
        """Whether the calls' text is whole so far (`Parsed.complete`)."""
        if self.plan.mode == "required":
            return self._required.closed
        if self.plan.mode == "auto":
            return all(c.whole for c in self._hermes.calls[:1 if self.plan.single else None])
        return True

    def feed(self, text: str, *, finished: bool) -> Delta:
        if self.plan.mode == "named":
            self._named.arguments += text
            out = Delta(tool_calls=_pieces([self._named], flush=finished))
        elif self.plan.mode == "required":
            self._required.feed(text)
            out = Delta(tool_calls=_pieces(self._required.calls, flush=finished))
        else:
            self._hermes.feed(text, finished=finished)
            content, self._sent = self._hermes.content[self._sent:], len(self._hermes.content)
            out = Delta(content=content or None, tool_calls=_pieces(self._hermes.calls, flush=True))
        if self.plan.single:
            out.tool_calls = [t for t in out.tool_calls if t.index == 0]
        self.called = self.called or bool(out.tool_calls)
        return out


def stream_reader(plan: ToolPlan) -> StreamReader:
    return StreamReader(plan)


def _pieces(calls: list[_Call], *, flush: bool) -> list[DeltaToolCall]:
    """The new pieces of `calls`: a call's first once its arguments begin (or at once, `flush`), with id, type
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
