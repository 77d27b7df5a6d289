"""One JSON value read as its text streams in, for tool calls whose arguments stream as they are generated (what
vLLM's hermes parser does with `partial_json_parser`). `PartialJson` is fed text a piece at a time and writes the
value's canonical text, `json.dumps(json.loads(text), ensure_ascii=False)`'s, as far as it is certain: what it has
written at any step is a prefix of what it writes in the end, however the text was cut into pieces. It says when the
value is whole, and stops at the first character that is not JSON, keeping what it had. Of a top-level object it
keeps each member's value too (a tool call's "name" and "arguments").

Why not `partial_json_parser` (which is not in this environment either): it completes a prefix into a value (closing
strings and brackets, guessing a number's end), and what of that value's text is certain must then be worked out by
diffing, which is where vLLM's stream and whole answers part (whitespace, numbers like `1.50`). Reading the grammar
a character at a time writes only what is certain, and finds broken JSON at the first bad character.

Plain text; no tensors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")  # RFC 8259's number
NUMBER_CHARACTERS = frozenset("0123456789+-.eE")
LITERALS = ("true", "false", "null")
ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}  # \x -> character
WHITESPACE = frozenset(" \t\n\r")
CLOSER = {"{": "}", "[": "]"}

# what may come next, outside strings, numbers and literals
Expect = Literal["value", "value_or_close", "key", "key_or_close", "colon", "next", "end"]


@dataclass
class Member:
    """One member of a top-level object: its value's canonical text so far, and whether that value is whole."""

    text: str = ""
    whole: bool = False


@dataclass
class PartialJson:
    """Reads one JSON value, a character at a time (`feed`; `end` once the text is over)."""

    text: str = ""  # the canonical text so far
    whole: bool = False  # the value ended (only whitespace may follow)
    broken: bool = False  # a character was not JSON (or a top-level key came twice): reading stopped there
    members: dict[str, Member] = field(default_factory=dict)  # a top-level object's members, by key
    _stack: list[str] = field(default_factory=list)  # the open containers, "{" or "["
    _expect: Expect = "value"
    _scalar: Literal["string", "key", "number", "literal"] | None = None  # being read
    _raw: str = ""  # a number's or literal's characters so far
    _escape: str | None = None  # inside a string: after "\" ("" then "u" and its hex digits)
    _high: int | None = None  # a \u high surrogate, waiting for its low half
    _key: list[str] = field(default_factory=list)  # a key's characters so far
    _last_key: str | None = None  # the top-level key read last
    _member: str | None = None  # the top-level key whose value is being read

    def feed(self, text: str) -> None:
        for c in text:
            if self.broken:
                return
            self._char(c)

    def end(self) -> None:
        """The text is over: a number at its end is whole (it had nothing after it to end it)."""
        if not self.broken and self._scalar == "number":
            self._number_done()

    # -- structure --------------------------------------------------------------------------------------------------

    def _char(self, c: str) -> None:
        if self._scalar in ("string", "key"):
            self._string_char(c)
            return
        if self._scalar == "number":
            if c in NUMBER_CHARACTERS:
                self._raw += c
                return
            self._number_done()
            if self.broken:
                return
        elif self._scalar == "literal":
            self._literal_char(c)
            return
        if c in WHITESPACE:
            return
        expect = self._expect
        if expect in ("value", "value_or_close"):
            if c == "]" and expect == "value_or_close":
                self._close(c)
            else:
                self._value(c)
        elif expect in ("key", "key_or_close"):
            if c == '"':
                self._scalar, self._key = "key", []
                self._emit('"')
            elif c == "}" and expect == "key_or_close":
                self._close(c)
            else:
                self._break()
        elif expect == "colon" and c == ":":
            self._emit(": ")
            self._expect = "value"
        elif expect == "next" and c == ",":
            self._emit(", ")
            self._expect = "key" if self._stack[-1] == "{" else "value"
        elif expect == "next" and c == CLOSER[self._stack[-1]]:
            self._close(c)
        else:
            self._break()

    def _value(self, c: str) -> None:
        if self._stack == ["{"]:  # a top-level member's value begins
            assert self._last_key is not None
            self._member = self._last_key
            self.members[self._member] = Member()
        if c in "{[":
            self._stack.append(c)
            self._emit(c)
            self._expect = "key_or_close" if c == "{" else "value_or_close"
        elif c == '"':
            self._scalar, self._key = "string", []
            self._emit('"')
        elif c == "-" or c.isdigit():
            self._scalar, self._raw = "number", c
        elif c in "tfn":
            self._scalar, self._raw = "literal", c
        else:
            self._break()

    def _close(self, c: str) -> None:
        self._stack.pop()
        self._emit(c)
        self._value_done()

    def _value_done(self) -> None:
        self._scalar = None
        if not self._stack:
            self.whole, self._expect = True, "end"
            return
        self._expect = "next"
        if self._stack == ["{"] and self._member is not None:  # a top-level member's value ended
            self.members[self._member].whole = True
            self._member = None

    def _emit(self, s: str) -> None:
        self.text += s
        if self._member is not None:
            self.members[self._member].text += s

    def _break(self) -> None:
        self.broken = True

    # -- scalars ----------------------------------------------------------------------------------------------------

    def _number_done(self) -> None:
        if not NUMBER.fullmatch(self._raw):
            self._break()
            return
        self._emit(_number(self._raw))
        self._value_done()

    def _literal_char(self, c: str) -> None:
        raw = self._raw + c
        if not any(word.startswith(raw) for word in LITERALS):
            self._break()
            return
        self._raw = raw
        if raw in LITERALS:
            self._emit(raw)
            self._value_done()

    def _string_char(self, c: str) -> None:
        if self._escape == "":
            if c == "u":
                self._escape = "u"
            elif c in ESCAPED:
                self._escape = None
                self._flush_high()
                self._out(ESCAPED[c])
            else:
                self._break()
        elif self._escape is not None:  # \u and its hex digits so far
            if c not in "0123456789abcdefABCDEF":
                self._break()
                return
            self._escape += c
            if len(self._escape) == 5:
                code, self._escape = int(self._escape[1:], 16), None
                self._code(code)
        elif c == "\\":
            self._escape = ""
        elif c == '"':
            self._flush_high()
            self._emit('"')
            self._string_done()
        elif ord(c) < 0x20:  # a control character must be escaped (json.loads' strict mode)
            self._break()
        else:
            self._flush_high()
            self._out(c)

    def _code(self, code: int) -> None:
        """A \\uXXXX escape: a surrogate pair joins into one character; a lone half stays escaped (written raw, it
        could not be encoded as UTF-8)."""
        if self._high is not None and 0xDC00 <= code <= 0xDFFF:
            high, self._high = self._high, None
            self._out(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)))
            return
        self._flush_high()
        if 0xD800 <= code <= 0xDBFF:
            self._high = code
        elif 0xDC00 <= code <= 0xDFFF:
            self._lone(code)
        else:
            self._out(chr(code))

    def _flush_high(self) -> None:
        if self._high is not None:
            high, self._high = self._high, None
            self._lone(high)

    def _lone(self, code: int) -> None:
        self._emit(f"\\u{code:04x}")
        self._key.append(chr(code))

    def _out(self, ch: str) -> None:
        self._emit(json.dumps(ch, ensure_ascii=False)[1:-1])
        self._key.append(ch)

    def _string_done(self) -> None:
        if self._scalar == "string":
            self._value_done()
            return
        key = "".join(self._key)
        self._scalar, self._expect = None, "colon"
        if self._stack == ["{"]:
            if key in self.members:  # which value counts cannot be said as it streams (json.loads keeps the last)
                self._break()
            self._last_key = key


def _number(raw: str) -> str:
    """A whole number's canonical text (`1.50` -> `1.5`, `1E2` -> `100.0`), or its own where that would not be JSON
    (an overflowing float) or Python will not read it (an int of thousands of digits)."""
    try:
        text = json.dumps(json.loads(raw))
    except ValueError:
        return raw
    return raw if text in ("Infinity", "-Infinity", "NaN") else text
