"""Tool calling on /v1/chat/completions (server/api/tools.py, server/api/tool_parsers.py): the real SmolLM2 served
over HTTP with --tool-call-parser hermes, read by the official `openai` client; streamed answers accumulated by the
client's own stream state equal unstreamed ones; tools and tool-call history reach the chat template; bad tool
requests are 400s that say what is allowed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from typer.testing import CliRunner

from server.api.tool_parsers import Parsed, parse, stream_reader
from server.api.tools import ChatTool, ToolPlan
from server.cli import app

from tests.conftest import bos_word_tokenizer
from tests.serving import Process, painters_server, serve_tiny

MODEL = "smollm2-135m"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
           "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
          "required": ["query"]}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME, "web_search": SEARCH}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name.replace('_', ' ')}",
                                           "parameters": schema}} for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# SmolLM2 writes no Hermes blocks of itself: a regular expression makes it write one, for the auto path to read
HERMES = (r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,10}", '
          r'"unit": "(celsius|fahrenheit)"\}\}</tool_call>')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    with painters_server(Path(tmp_path_factory.mktemp("tools")), extra=("--tool-call-parser", "hermes")) as p:
        yield p



def _create(client: openai.OpenAI, **body: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=body.pop("messages", ASK), tools=body.pop(
        "tools", TOOLS), max_tokens=body.pop("max_tokens", 60), temperature=body.pop("temperature", 0), **body)


def _streamed(client: openai.OpenAI, **body: Any) -> Any:
    """The same request streamed, accumulated by the openai client's own stream state (as `.stream()` does; its
    snapshot, as `get_final_completion` refuses a choice cut by max_tokens)."""
    state = ChatCompletionStreamState()
    for chunk in _create(client, stream=True, **body):
        state.handle_chunk(chunk)
    return state.current_completion_snapshot


def _answer(completion: Any) -> list[tuple[Any, ...]]:
    """What a completion says, per choice, ids aside (each answer draws its own)."""
    return [(c.message.content or None, [(t.type, t.function.name, t.function.arguments)
                                         for t in c.message.tool_calls or ()], c.finish_reason)
            for c in sorted(completion.choices, key=lambda c: c.index)]


def _valid_calls(calls: Any) -> None:
    assert calls
    ids = [t.id for t in calls]
    assert len(set(ids)) == len(ids) and all(i.startswith("chatcmpl-tool-") for i in ids), ids
    for t in calls:
        assert t.type == "function"
        jsonschema.validate(json.loads(t.function.arguments), SCHEMAS[t.function.name])


def test_named_tool_choice_answers_a_call_to_that_function(client):
    """vLLM's answer: content "", one call to the named function whose arguments follow its schema, finish "stop"."""
    out = _create(client, tool_choice=NAMED)
    [choice] = out.choices
    assert choice.message.content == "" and choice.finish_reason == "stop"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    _valid_calls([call])
    assert json.loads(call.function.arguments)["city"] == "Paris"


def test_required_calls_one_or_more_of_the_tools(client):
    for ask in ("What time is it in Tokyo?", "What is the weather like in Paris today?"):
        out = _create(client, tool_choice="required", messages=[{"role": "user", "content": ask}], max_tokens=80)
        [choice] = out.choices
        assert choice.message.content == "" and choice.finish_reason == "tool_calls", choice
        _valid_calls(choice.message.tool_calls)
        assert {t.function.name for t in choice.message.tool_calls} <= set(SCHEMAS)


def test_a_stop_string_that_cuts_the_calls_leaves_finish_reason_stop(client):
    """A required call cut by a stop string ("Paris", inside its arguments) is not a finished call: its arguments are
    not JSON, and finish_reason "tool_calls" said it was (vLLM's required path fails to parse the cut array). It is
    "stop", streamed and not; uncut, "tool_calls"."""
    body = {"tool_choice": "required", "stop": ["Paris"]}
    for out in (_create(client, **body), _streamed(client, **body)):
        [choice] = out.choices
        [call] = choice.message.tool_calls
        assert choice.finish_reason == "stop" and call.function.arguments.rstrip().endswith('"'), choice
        with pytest.raises(json.JSONDecodeError):
            json.loads(call.function.arguments)
    assert _create(client, tool_choice="required").choices[0].finish_reason == "tool_calls"


def test_streams_accumulate_to_the_unstreamed_answer(client):
    """Greedy, each tool_choice streamed and accumulated by the openai client equals the unstreamed answer."""
    for body in ({"tool_choice": NAMED}, {"tool_choice": "required"},
                 {"tool_choice": "auto", "extra_body": {"guided_regex": HERMES}},
                 {"tool_choice": "auto", "max_tokens": 16}, {"tool_choice": "none", "max_tokens": 16}):
        whole, streamed = _create(client, **body), _streamed(client, **body)
        assert _answer(streamed) == _answer(whole), body
        if body["tool_choice"] != "none" and whole.choices[0].message.tool_calls:
            _valid_calls(streamed.choices[0].message.tool_calls)


def test_n_choices_each_call_and_stream_alike(client):
    body = {"tool_choice": "required", "n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 80}
    whole = _create(client, **body)
    assert len(whole.choices) == 3
    for choice in whole.choices:
        if choice.finish_reason == "tool_calls":
            _valid_calls(choice.message.tool_calls)
    assert _answer(_streamed(client, **body)) == _answer(whole)


def test_streamed_pieces_are_openais(http):
    """Each call's first piece carries id, type and name (and arguments begun); the later ones carry only more
    argument text; a named call finishes "stop", required ones "tool_calls"."""
    for choice, reason in ((NAMED, "stop"), ("required", "tool_calls")):
        pieces, reasons = [], []
        with http.stream("POST", "/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "tool_choice": choice,
                                                                "max_tokens": 60, "temperature": 0,
                                                                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    [c] = json.loads(line[6:])["choices"]
                    pieces += c["delta"].get("tool_calls", [])
                    reasons.append(c["finish_reason"])
        assert reasons[-1] == reason and not any(reasons[:-1])
        first = pieces[0]
        assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("chatcmpl-tool-")
        assert first["function"]["name"] == "get_weather"
        later = [p for p in pieces[1:] if p["index"] == 0]
        assert later and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in later)
        jsonschema.validate(json.loads(first["function"]["arguments"] + "".join(p["function"]["arguments"]
                                                                                  for p in later)), WEATHER)


def test_auto_reads_hermes_calls_and_leaves_plain_answers_alone(client):
    """tool_choice "auto" (here the default, tools given) with --tool-call-parser hermes: a <tool_call> block is a
    call (content null, finish "tool_calls", as vLLM's parser answers); an answer without one is content."""
    called = _create(client, extra_body={"guided_regex": HERMES})
    [choice] = called.choices
    assert choice.message.content is None and choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    _valid_calls([call])
    plain = _create(client, max_tokens=12)
    [choice] = plain.choices
    assert choice.message.tool_calls is None and choice.message.content and choice.finish_reason == "length"


def test_auto_reads_several_calls_and_parallel_tool_calls_false_keeps_the_first(client):
    twice = {"extra_body": {"guided_regex": f"{HERMES}\n{HERMES}"}, "max_tokens": 150}
    both = _create(client, **twice)
    assert [t.function.name for t in both.choices[0].message.tool_calls] == ["get_weather"] * 2
    _valid_calls(both.choices[0].message.tool_calls)
    assert _answer(_streamed(client, **twice)) == _answer(both)
    first = _create(client, parallel_tool_calls=False, **twice)
    assert _answer(first) == [(None, _answer(both)[0][1][:1], "tool_calls")]
    assert _answer(_streamed(client, parallel_tool_calls=False, **twice)) == _answer(first)


TIME_CALL = (r'<tool_call>\{"name": "get_time", "arguments": \{"timezone": "[A-Z][a-z]{2,8}/[A-Z][a-z]{2,8}"\}\}'
             r'</tool_call>')
TWO_CALLS = rf"Checking\. {HERMES}\n{TIME_CALL}"


def test_hermes_calls_stream_their_arguments_as_generated(client):
    """The real SmolLM2 writes text and two calls (a regular expression makes it), streamed through the official
    client's `.stream()`: the text streams as content and none of the markup does; each call opens with a delta of
    index, id, type and name (arguments ""), then its arguments come in many deltas before the next call opens; the
    client ends with the unstreamed answer, finish_reason "tool_calls"."""
    body = {"guided_regex": TWO_CALLS}
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=150,
                                        extra_body=body) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    choices = [e.chunk.choices[0].model_dump(exclude_unset=True) for e in events if e.type == "chunk"]
    content = "".join(c["delta"].get("content") or "" for c in choices)
    pieces = [t for c in choices for t in c["delta"].get("tool_calls", [])]
    assert content == "Checking. " and [c["finish_reason"] for c in choices if c["finish_reason"]] == ["tool_calls"]
    opens = [n for n, t in enumerate(pieces) if "id" in t]
    assert [pieces[n]["function"] for n in opens] == [{"name": "get_weather", "arguments": ""},
                                                      {"name": "get_time", "arguments": ""}]
    assert [pieces[n]["index"] for n in opens] == [0, 1] and opens[0] == 0 and opens[1] > 5
    assert all(t["index"] == 0 and set(t) == {"index", "function"} for t in pieces[1:opens[1]])
    assert all(t["index"] == 1 for t in pieces[opens[1]:])
    deltas = [e.index for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert deltas.count(0) > 5 and deltas.count(1) > 5
    whole = _create(client, extra_body=body, max_tokens=150)
    assert _answer(final) == _answer(whole) and whole.choices[0].message.content == "Checking. "
    assert [t.function.name for t in whole.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    _valid_calls(whole.choices[0].message.tool_calls)


def test_a_hermes_call_cut_by_max_tokens_keeps_what_was_written(client):
    """Cut mid-arguments, the call stands with its arguments as far as written (vLLM's stream keeps it too, closed
    with text the model never wrote; its whole answer makes it content): finish_reason "length", streamed or not."""
    full = _create(client, extra_body={"guided_regex": HERMES}, logprobs=True)
    tokens = [t.token for t in full.choices[0].logprobs.content]
    cut = next(n for n in range(len(tokens)) if '"city": "' in "".join(tokens[:n]))  # the city's value has begun
    body = {"extra_body": {"guided_regex": HERMES}, "max_tokens": cut}
    whole = _create(client, **body)
    [(content, [(kind, name, arguments)], reason)] = _answer(whole)
    assert content is None and name == "get_weather" and reason == "length"
    assert full.choices[0].message.tool_calls[0].function.arguments.startswith(arguments) and '"city": "' in arguments
    with pytest.raises(json.JSONDecodeError):
        json.loads(arguments)
    assert _answer(_streamed(client, **body)) == _answer(whole)


@pytest.mark.parametrize("regex,content,calls", [
    # not JSON before its name is read: the whole answer is content (vLLM's fallback), streamed alike
    (r'<tool_call>\{"name": get_weather\}</tool_call>', '<tool_call>{"name": get_weather}</tool_call>', []),
    # breaks after its name went out: the call stands as far as it was JSON, and is not whole ("stop")
    (r'<tool_call>\{"name": "get_weather", "arguments": \{"city": Paris\}\}</tool_call>', None,
     [("function", "get_weather", '{"city": ')]),
], ids=["not-json", "breaks-in-arguments"])
def test_malformed_hermes_blocks_read_alike_streamed_or_not(client, regex, content, calls):
    body = {"extra_body": {"guided_regex": regex}}
    whole = _create(client, **body)
    assert _answer(whole) == [(content, calls, "stop")]
    assert _answer(_streamed(client, **body)) == _answer(whole)


def test_hermes_streams_with_n_and_logprobs(client):
    """n = 3, sampled with a seed: each choice streams its own calls from index 0 and adds up to its unstreamed
    answer; with logprobs the calls are the same and every token's logprob comes (none lost to held-back text)."""
    body = {"n": 3, "temperature": 1.0, "seed": 5, "logprobs": True, "top_logprobs": 2, "max_tokens": 150,
            "extra_body": {"guided_regex": rf"(Checking\. )?{HERMES}(\n{TIME_CALL})?"}}
    state, opens = ChatCompletionStreamState(), {i: [] for i in range(3)}
    for chunk in _create(client, stream=True, **body):
        state.handle_chunk(chunk)
        for c in chunk.choices:
            opens[c.index] += [t.index for t in c.delta.tool_calls or () if t.id]
    streamed, whole = state.current_completion_snapshot, _create(client, **body)
    assert _answer(streamed) == _answer(whole)
    assert {len(c.message.tool_calls) for c in whole.choices} <= {1, 2}
    assert any(len(c.message.tool_calls) == 2 for c in whole.choices)
    assert [opens[c.index] for c in whole.choices] == [list(range(len(c.message.tool_calls))) for c in whole.choices]
    for w, s in zip(sorted(whole.choices, key=lambda c: c.index), sorted(streamed.choices, key=lambda c: c.index)):
        assert [t.token for t in s.logprobs.content] == [t.token for t in w.logprobs.content]
    assert sum(len(w.logprobs.content) for w in whole.choices) == whole.usage.completion_tokens


def test_required_among_no_tools_is_none(http):
    """OpenAI's (and vLLM's) reading: "required" with an empty tools list asks for no call."""
    r = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [], "tool_choice": "required",
                                                "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"] and "tool_calls" not in message


def test_tool_call_history_renders(client):
    """An assistant message with tool_calls and null content, then the tool's answer: SmolLM2's template renders it
    (its content as ""), and the conversation goes on."""
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"}]
    out = _create(client, messages=history, tool_choice="none", max_tokens=8)
    assert out.choices[0].message.content and out.choices[0].message.tool_calls is None


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with painters_server(Path(tmp_path_factory.mktemp("gemma")), model="gemma3-270m") as p, \
            httpx.Client(base_url=p.url, timeout=120) as c:
        yield c


def test_gemma_base_model_answers_tool_chats_with_a_clear_400(gemma):
    """The embedded Gemma 3 270M is a base model: its tokenizer has no chat template, so every chat, tool calls
    and history among them, is a 400 naming the template (not a 500)."""
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for body in ({"messages": history}, {"messages": ASK, "tools": TOOLS, "tool_choice": "required"}):
        r = gemma.post("/v1/chat/completions", json={"max_tokens": 4, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "chat template" in r.json()["error"]["message"]


def test_serve_takes_only_known_tool_call_parsers():
    out = CliRunner().invoke(app, ["serve", "--tool-call-parser", "xml"])
    assert out.exit_code == 2 and "hermes" in out.output


# -- bad requests ----------------------------------------------------------------------------------------------------

def _tool(name: str, parameters: Any = None) -> dict[str, Any]:
    function = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": function}


BAD: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("name-with-a-space", {"tools": [_tool("get weather")]}, ("1 to 64 letters, digits, '_' or '-'",)),
    ("name-too-long", {"tools": [_tool("f" * 65)]}, ("1 to 64 letters, digits, '_' or '-'",)),
    ("names-twice", {"tools": [_tool("f"), _tool("g"), _tool("f")], "tool_choice": "required"}, ("unique", "f")),
    ("not-a-function-tool", {"tools": [{"type": "retrieval", "function": {"name": "f"}}], "tool_choice": "none"},
     ("function",)),
    ("parameters-not-an-object-schema", {"tools": [_tool("f", {"type": "array"})], "tool_choice": "required"},
     ("type 'object'",)),
    ("choice-names-another-function", {"tools": [_tool("f"), _tool("g")], "tool_choice": {
        "type": "function", "function": {"name": "h"}}}, ("'h'", "f, g")),
    ("choice-without-tools", {"tool_choice": "required"}, ("needs tools",)),
    ("choice-unknown", {"tools": [_tool("f")], "tool_choice": "any"}, ("none", "auto", "required")),
    ("named-and-response-format", {"tools": [_tool("f")], "tool_choice": {"type": "function", "function": {
        "name": "f"}}, "response_format": {"type": "json_object"}}, ("response_format", "send one")),
    ("required-and-guided-json", {"tools": [_tool("f")], "tool_choice": "required", "guided_json": {"type": "object"}},
     ("guided_json", "send one")),
    # ignore_eos decoded on past the call's JSON, unconstrained: its arguments were the JSON and more text
    ("named-and-ignore-eos", {"tools": [_tool("f")], "tool_choice": {"type": "function", "function": {"name": "f"}},
                              "ignore_eos": True}, ("ignore_eos", "arguments' JSON")),
    ("required-and-ignore-eos", {"tools": [_tool("f")], "tool_choice": "required", "ignore_eos": True},
     ("ignore_eos", "leave ignore_eos out")),
    ("history-arguments-not-json", {"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": "{city: Paris"}}]}]},
     ("JSON text",)),
    ("old-functions", {"functions": [{"name": "f"}]}, ("send tools",)),
    ("defs-that-disagree", {"tool_choice": "required", "tools": [
        _tool(name, {"type": "object", "$defs": {"d": {"type": kind}}, "properties": {"a": {"$ref": "#/$defs/d"}}})
        for name, kind in (("f", "string"), ("g", "integer"))]}, ("$defs", "'d'")),
]


@pytest.mark.parametrize("body,says", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_tool_requests_are_400s_that_say_what_is_allowed(http, body, says):
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert all(s in message for s in says), message
    assert http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2}).status_code == 200


def test_auto_without_a_parser_names_the_flag_and_what_works():
    """Without --tool-call-parser, "auto" (sent, or the default when tools are given) is refused, as vLLM refuses
    it without --enable-auto-tool-choice; the other choices are served."""
    with serve_tiny() as url, httpx.Client(base_url=url, timeout=60) as http:
        for extra in ({"tool_choice": "auto"}, {}):
            r = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [_tool("f")], **extra})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "tool_choice"
            assert all(s in error["message"] for s in ("--tool-call-parser", "hermes", '"none"', '"required"'))


# -- tools and tool-call history reach the chat template -----------------------------------------------------------

# A Hermes-like template over bos_word_tokenizer's words: tools by name, a call's name and an argument (the arguments
# an object, not JSON text), a tool message's tool_call_id and content.
TEMPLATE = ("{{ bos_token }}{% for t in tools or [] %}{{ t['function']['name'] }} {% endfor %}"
            "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
            "{% for c in m['tool_calls'] or [] %}{{ c['function']['name'] }} {{ c['function']['arguments']['a'] }} "
            "{% endfor %}{% if m['tool_call_id'] %}{{ m['tool_call_id'] }} {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def test_tools_and_calls_reach_the_chat_template():
    tokenizer = bos_word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    history = [{"role": "user", "content": "hello"},
               {"role": "assistant", "content": None, "tool_calls": [{
                   "id": "x", "type": "function", "function": {"name": "sat", "arguments": '{"a": "cat"}'}}]},
               {"role": "tool", "tool_call_id": "there", "content": "world"}]
    with serve_tiny(tokenizer=tokenizer) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={
            "messages": history, "tools": [_tool("the"), _tool("hi")], "tool_choice": "none", "max_tokens": 1,
            "prompt_logprobs": 0})
        assert r.status_code == 200, r.text
        prompt = [next(iter(p.values()))["decoded_token"] for p in r.json()["prompt_logprobs"][1:]]
        # tools "the" and "hi"; the call "sat" with its argument "cat" (null content as ""); the tool message (its
        # role is no word here: <pad>) with its tool_call_id "there"
        assert " ".join(prompt) == "the hi user : hello assistant : sat cat <pad> : world there assistant :"
        # /tokenize renders the same prompt, tools included (vLLM's takes them): its count is the chat's
        tokenized = http.post("/tokenize", json={"messages": history, "tools": [_tool("the"), _tool("hi")]})
        assert tokenized.status_code == 200, tokenized.text
        assert tokenized.json()["count"] == r.json()["usage"]["prompt_tokens"] == len(prompt) + 1


# -- reading calls out of text, whole or in pieces (no model) --------------------------------------------------------

PLANS = {mode: ToolPlan(mode, tuple(ChatTool.model_validate(t) for t in TOOLS), name="get_weather" if mode == "named"
                        else None, parser="hermes" if mode == "auto" else None) for mode in ("named", "required", "auto")}
TEXTS = {
    "named": ['{"city": "Paris", "unit": "celsius"}', '{\n  "city": "Q\\"uo\\\\te}{",\n  "unit": "fahrenheit"\n}', ""],
    "required": ['[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}]',
                 '[ {"name":"get_time","parameters":{"timezone":"UTC"}} ,\n {"name": "web_search", "parameters": '
                 '{"query": "a, b] {c}", "limit": 3}}]',
                 r'[{"name": "web_search", "parameters": {"query": "say \"}]\" \\"}}, {"name": "get_time", '
                 r'"parameters": {"timezone": "\u00e9"}}]',
                 '[{"name": "web_search", "parameters": {"query": "cut sh'],  # cut by max_tokens
    "auto": ['plain words, no call', 'let me look <tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}'
             '</tool_call>\n<tool_call>{"name": "web_search", "arguments": {"query": "x"}}</tool_call>',
             '<tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}</tool_call>',
             'half a <tool_call>{"name": "get_time", "argu', 'a <tool_call> that is not JSON </tool_call>', 'a <tool_'],
}


def _fed(mode: str, pieces: list[str]) -> tuple[str | None, list[tuple[str, str]], bool, bool]:
    """A stream reader fed `pieces` (the last finished): the content and calls its deltas add up to, as the openai
    client joins them, whether a call went out, and whether the calls are whole."""
    reader = stream_reader(PLANS[mode])
    content, calls = None, {}
    for n, piece in enumerate(pieces):
        delta = reader.feed(piece, finished=n == len(pieces) - 1)
        if delta.content is not None:
            content = (content or "") + delta.content
        for t in delta.tool_calls:
            if t.index not in calls:  # a call's first piece names it
                assert t.id and t.type == "function" and t.function.name, t
                calls[t.index] = [t.function.name, ""]
            else:
                assert t.id is None and t.function.name is None, t
            calls[t.index][1] += t.function.arguments or ""
    return content, [tuple(calls[i]) for i in sorted(calls)], reader.called, reader.complete


def _pieced(mode: str, text: str, size: int) -> tuple[str | None, list[tuple[str, str]], bool]:
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    return _fed(mode, pieces)[:3]


@pytest.mark.parametrize("mode", list(TEXTS))
def test_pieces_of_any_size_add_up_to_the_whole_answer(mode):
    for text in TEXTS[mode]:
        whole = parse(PLANS[mode], text)
        calls = [(c.function.name, c.function.arguments) for c in whole.calls]
        for size in (1, 2, 3, 7, len(text) or 1):
            content, pieced, called = _pieced(mode, text, size)
            assert pieced == calls and called == bool(calls), (text, size)
            assert (content or None) == (whole.content or None), (text, size)


def test_required_arguments_are_each_calls_parameters():
    whole = parse(PLANS["required"], TEXTS["required"][1])
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.calls] == [
        ("get_time", {"timezone": "UTC"}), ("web_search", {"query": "a, b] {c}", "limit": 3})]
    escaped = parse(PLANS["required"], TEXTS["required"][2])
    assert [(c.function.name, json.loads(c.function.arguments)) for c in escaped.calls] == [
        ("web_search", {"query": 'say "}]" \\'}), ("get_time", {"timezone": "\u00e9"})]


def test_hermes_reads_as_vllms_parser():
    """Content before the first block (null when none), calls' arguments re-serialized; text whose blocks are not
    calls stays content."""
    called = parse(PLANS["auto"], TEXTS["auto"][1])
    assert called.content == "let me look "
    assert [(c.function.name, c.function.arguments) for c in called.calls] == [
        ("get_time", '{"timezone": "UTC"}'), ("web_search", '{"query": "x"}')]
    assert parse(PLANS["auto"], TEXTS["auto"][2]).content is None
    for text in (TEXTS["auto"][0], TEXTS["auto"][4], TEXTS["auto"][5]):
        assert parse(PLANS["auto"], text) == Parsed(text, [])


# hermes answers, and what both readings make of them: content, calls, and whether the calls are whole
CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
HERMES_TEXTS = {
    "text then two calls, re-serialized": (
        'Let me check. <tool_call>\n' + CALL + '\n</tool_call>\n<tool_call>{"name":"web_search","arguments":'
        '{"query":"caf\\u00e9 \\"best\\"\\n","limit":3.50e0}}</tool_call>\n',
        "Let me check. ", [("get_weather", '{"city": "Paris", "unit": "celsius"}'),
                           ("web_search", '{"query": "café \\"best\\"\\n", "limit": 3.5}')], True),
    "cut mid-arguments": ('<tool_call>{"name": "get_weather", "arguments": {"city": "Pa', None,
                          [("get_weather", '{"city": "Pa')], False),
    "cut before its name": ('hm <tool_call>{"name": "get_wea', 'hm <tool_call>{"name": "get_wea', [], True),
    "not JSON": ('a <tool_call> that is not JSON </tool_call> b', 'a <tool_call> that is not JSON </tool_call> b',
                 [], True),
    "name not a string": ('<tool_call>{"name": 7, "arguments": {}}</tool_call>',
                          '<tool_call>{"name": 7, "arguments": {}}</tool_call>', [], True),
    "breaks after its name": ('<tool_call>{"name": "get_time", "arguments": {"timezone": UTC}}</tool_call>', None,
                              [("get_time", '{"timezone": ')], False),
    "a later block not a call": ('<tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}</tool_call>'
                                 '<tool_call>oops</tool_call>', None, [("get_time", '{"timezone": "UTC"}')], True),
    "name not writable": ('<tool_call>{"name": "a\\ud800", "arguments": {}}</tool_call>',
                          '<tool_call>{"name": "a\\ud800", "arguments": {}}</tool_call>', [], True),
    "no arguments": ('<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", "{}")], True),
    "arguments before the name": ('<tool_call>{"arguments": {"timezone": "UTC"}, "name": "get_time"}</tool_call>',
                                  None, [("get_time", '{"timezone": "UTC"}')], True),
    "no end tag": ('<tool_call>' + CALL, None, [("get_weather", '{"city": "Paris", "unit": "celsius"}')], True),
    "markup inside a string": ('<tool_call>{"name": "web_search", "arguments": {"query": "<tool_call>"}}</tool_call>',
                               None, [("web_search", '{"query": "<tool_call>"}')], True),
    "what only looks like markup": ("a <tool_ca b <", "a <tool_ca b <", [], True),
}


def _splits(text: str) -> Iterator[list[str]]:
    """The text in two pieces at every boundary (with an empty step between), and a character at a time."""
    for at in range(len(text) + 1):
        yield [text[:at], "", text[at:]]
    yield list(text)


@pytest.mark.parametrize("text,content,calls,whole", HERMES_TEXTS.values(), ids=HERMES_TEXTS)
def test_hermes_streams_at_every_split_as_it_reads_whole(text, content, calls, whole):
    """The whole answer is read as decided (`HermesCalls`), and the stream, cut anywhere, adds up to it."""
    parsed = parse(PLANS["auto"], text)
    assert (parsed.content, [(c.function.name, c.function.arguments) for c in parsed.calls], parsed.complete) == (
        content, calls, whole)
    for pieces in _splits(text):
        assert _fed("auto", pieces) == (content if calls else text, calls, bool(calls), whole), pieces


def test_hermes_arguments_stream_as_they_are_written():
    """vLLM's stream: content up to the block, none of its markup; the call's first delta once its name is read
    (id, type, name, arguments ""), then its arguments a few characters at a time, never more than is certain."""
    text = "Sure. <tool_call>" + CALL + "</tool_call>"
    reader = stream_reader(PLANS["auto"])
    content, arguments, named_at, steps = "", "", None, 0
    for n, c in enumerate(text):
        delta = reader.feed(c, finished=n == len(text) - 1)
        content += delta.content or ""
        for t in delta.tool_calls:
            if t.function.name is not None:
                assert named_at is None and t.index == 0 and t.function.arguments == ""
                named_at = n
            else:
                steps += 1
            arguments += t.function.arguments or ""
        assert '{"city": "Paris", "unit": "celsius"}'.startswith(arguments)
        if text[:n + 1].endswith('"Pa'):
            assert arguments == '{"city": "Pa'
    assert content == "Sure. " and named_at == text.index('"get_weather"') + len('"get_weather"') - 1
    assert arguments == '{"city": "Paris", "unit": "celsius"}' and steps > 20
