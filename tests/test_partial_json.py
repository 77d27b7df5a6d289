"""The streaming JSON reader (server/api/partial_json.py): whatever the pieces, what it has written is always a
prefix of json.dumps' text of the value, and in the end is that text; broken JSON stops it where it breaks."""

from __future__ import annotations

import json

import pytest

from server.api.partial_json import PartialJson

VALUES = [
    '{"a": 1}', "[]", "{}", '"x"', "12", "-0", "true", '{"a":{"b":[{"c":"d"}, [], {}]}}',
    '{ "city" :"Par\\"is", "n":[1.50, -0, 1E2, 2e-3, true,false ,null], "s": "\\n\\t\\/\\\\\\b\\f\\r"}',
    '{"u": "\\u0041\\u00e9\\u0000\\u001f\\u2028\\ud83d\\ude00 caf\u00e9 \U0001f600"}',
    '\n {"name" : "get_time" ,\n "arguments" : { "timezone" : "UTC" } }\n',
]


def _read(pieces: list[str]) -> tuple[PartialJson, list[str]]:
    reader, seen = PartialJson(), []
    for piece in pieces:
        reader.feed(piece)
        seen.append(reader.text)
    reader.end()
    return reader, seen


@pytest.mark.parametrize("text", VALUES)
def test_writes_json_dumps_text_a_certain_prefix_at_a_time(text):
    want = json.dumps(json.loads(text), ensure_ascii=False)
    for size in range(1, len(text) + 1):
        reader, seen = _read([text[i:i + size] for i in range(0, len(text), size)])
        assert reader.whole and not reader.broken and reader.text == want, (size, reader.text)
        assert all(want.startswith(s) for s in seen), (size, seen)


def test_numbers_wait_for_their_end():
    """`1.5` could still become `1.5e3` (1500.0): a number is written once something ends it."""
    reader, seen = _read(list('{"n": 1.5e3, "m": 2'))
    assert seen[-1] == '{"n": 1500.0, "m": ' and reader.text == '{"n": 1500.0, "m": 2' and not reader.whole


def test_a_lone_surrogate_stays_escaped():
    """json.dumps(ensure_ascii=False) would write the lone half raw, which no UTF-8 response can carry."""
    reader, _ = _read(['"a\\ud800b\\udc00"'])
    assert reader.text == '"a\\ud800b\\udc00"' and json.loads(reader.text) == json.loads('"a\\ud800b\\udc00"')


def test_members_of_a_top_level_object():
    reader, _ = _read(['{"name": "f", "arguments": {"a": [1, 2]}, "x": "cut'])
    assert {k: (m.text, m.whole) for k, m in reader.members.items()} == {
        "name": ('"f"', True), "arguments": ('{"a": [1, 2]}', True), "x": ('"cut', False)}


@pytest.mark.parametrize("text,kept", [
    ('{"a": tru}', '{"a": '), ('{"a" 1}', '{"a"'), ('{"a": 01}', '{"a": '), ('{"a": "b\x01"}', '{"a": "b'),
    ('{"a": 1,}', '{"a": 1, '), ("[1 2]", "[1"), ('{"a": 1}x', '{"a": 1}'), ('{"a": "\\x"}', '{"a": "'),
    ('{"a": 1, "a": 2}', '{"a": 1, "a"'), ("NaN", ""), ("{'a': 1}", "{"),
])
def test_broken_json_stops_where_it_breaks(text, kept):
    """Not JSON (RFC 8259: json.loads' NaN is not; a top-level key given twice is refused too, as which value counts
    cannot be said as it streams): reading stops, keeping what was certain before."""
    reader, _ = _read(list(text))
    assert reader.broken and reader.text == kept, reader.text
