"""OpenAI's Responses API (server/api/responses.py, server/api/responses_protocol.py): the real SmolLM2 served over
HTTP, called by the official `openai` client (`responses.create`, `responses.stream`). A response is the chat answer to
the same conversation (greedy: equal text and usage); streamed deltas join to the unstreamed text, in OpenAI's event
order with numbered events; max_output_tokens cuts to status incomplete; text.format, function tools and function
call history go through chat's structured outputs and tool path; policies apply; bad requests are 400s naming what is
allowed."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.serving import Process, metric_value, painters_server, serve_tiny, wait_until

MODEL = "smollm2-135m"
ASK = "What is 2+2? Reply with just the number."
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
           "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TOOL = {"type": "function", "name": "get_weather", "description": "get weather", "parameters": WEATHER}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "get weather",
                                              "parameters": WEATHER}}
NAMED = {"type": "function", "name": "get_weather"}
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


STORE_MAX = 3  # the server keeps this many responses
BACKGROUND_MAX = 2  # and runs this many background responses at once


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    env = {"PAINTERS_RESPONSES_STORE": "true", "PAINTERS_RESPONSES_STORE_MAX": str(STORE_MAX),
           "PAINTERS_RESPONSES_BACKGROUND_MAX": str(BACKGROUND_MAX)}
    with painters_server(Path(tmp_path_factory.mktemp("responses")), extra=("--tool-call-parser", "hermes"),
                         env=env) as p:
        yield p


def _create(client: openai.OpenAI, **body: Any) -> Any:
    return client.responses.create(model=MODEL, input=body.pop("input", ASK), temperature=body.pop("temperature", 0),
                                   max_output_tokens=body.pop("max_output_tokens", 24), **body)


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]], **body: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=body.pop("max_tokens", 24), **body)


def _items(response: Any) -> list[tuple[Any, ...]]:
    """What a response's output says, ids aside."""
    return [(i.type, i.status, [(p.type, p.text) for p in i.content]) if i.type == "message" else
            (i.type, i.status, i.name, i.arguments) for i in response.output]


def test_a_response_is_the_chat_answer_to_the_same_conversation(client):
    """Greedy, input items (instructions, input_text parts, an earlier assistant turn) answer what chat answers to
    the same messages, with the same token counts; the response object is OpenAI's, its settings echoed."""
    conversation = [{"role": "user", "content": [{"type": "input_text", "text": "Hi!"}]},
                    {"role": "assistant", "content": [{"type": "output_text", "text": "Hello! How can I help?"}]},
                    {"type": "message", "role": "user", "content": ASK}]
    out = _create(client, input=conversation, instructions="Answer briefly.", metadata={"k": "v"}, user="u1")
    chat = _chat(client, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"},
                          {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": ASK}])
    assert out.output_text == chat.choices[0].message.content and "4" in out.output_text
    assert out.id.startswith("resp_") and out.object == "response" and out.status == "completed"
    assert out.incomplete_details is None and out.completed_at is not None
    [message] = out.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and [p.type for p in message.content] == ["output_text"]
    usage = out.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    again = _create(client, input=conversation, instructions="Answer briefly.").usage
    # the chat above computed the same prompt: all of it is cached but the last token, which is computed
    assert again.input_tokens_details.cached_tokens == again.input_tokens - 1 == usage.input_tokens - 1
    assert (out.model, out.instructions, out.metadata, out.user, out.temperature, out.top_p, out.max_output_tokens,
            out.tool_choice, out.tools, out.text.format.type) == (
        MODEL, "Answer briefly.", {"k": "v"}, "u1", 0, 1, 24, "auto", [], "text")


def test_max_output_tokens_cuts_the_response_to_incomplete(client):
    out = _create(client, input="Tell me a long story about a dragon.", max_output_tokens=5)
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.usage.output_tokens == 5 and out.output[0].status == "incomplete" and out.completed_at is None


def _events(client: openai.OpenAI, **body: Any) -> list[Any]:
    with client.responses.create(model=MODEL, input=body.pop("input", ASK), temperature=0, stream=True,
                                 max_output_tokens=body.pop("max_output_tokens", 24), **body) as stream:
        return list(stream)


@pytest.mark.parametrize("cut", [False, True], ids=["completed", "incomplete"])
def test_a_stream_is_openais_event_sequence_and_joins_to_the_unstreamed_answer(client, cut):
    body = {"input": "Tell me a long story about a dragon.", "max_output_tokens": 6} if cut else {}
    whole = _create(client, **body)
    events = _events(client, **body)
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    final = "response.incomplete" if cut else "response.completed"
    assert kinds == TEXT_EVENTS + ["response.output_text.delta"] * deltas + CLOSING + [final] and deltas >= 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text
    done = events[-1].response
    assert done.status == whole.status and done.output_text == text and _items(done) == _items(whole)
    assert done.id == events[0].response.id and events[0].response.status == "in_progress"
    item_ids = {e.item.id for e in events if e.type.startswith("response.output_item")}
    assert item_ids == {e.item_id for e in events if e.type.startswith("response.output_text")} == {done.output[0].id}
    assert done.usage.output_tokens == whole.usage.output_tokens


def test_the_clients_stream_helper_accumulates_the_response(client):
    with client.responses.stream(model=MODEL, input=ASK, temperature=0, max_output_tokens=24) as stream:
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == snapshots[-1] == _create(client).output_text


def test_include_logprobs_answers_chats_logprobs(client):
    """include message.output_text.logprobs (with top_logprobs alternatives): each token's entry is chat's for the
    same conversation; streamed, the deltas carry the same entries, and output_text.done all of them."""
    def entries(logprobs: Any) -> list[tuple[Any, ...]]:
        return [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in logprobs]

    include = ["message.output_text.logprobs"]
    out = _create(client, include=include, top_logprobs=2, max_output_tokens=8)
    chat = _chat(client, [{"role": "user", "content": ASK}], logprobs=True, top_logprobs=2, max_tokens=8)
    [part] = out.output[0].content
    want = entries(chat.choices[0].logprobs.content)
    assert entries(part.logprobs) == want and len(want) == out.usage.output_tokens and out.top_logprobs == 2
    assert all(len(e[2]) == 2 for e in want)
    events = _events(client, include=include, top_logprobs=2, max_output_tokens=8)
    assert entries(e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs) == want
    assert entries(next(e for e in events if e.type == "response.output_text.done").logprobs) == want
    assert _create(client).output[0].content[0].logprobs == []  # not asked for


def test_text_format_json_schema_answers_valid_json(client):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    text = {"format": {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}}
    out = _create(client, max_output_tokens=40, text=text)
    assert out.status == "completed"
    jsonschema.validate(json.loads(out.output_text), schema)
    assert out.text.format.type == "json_schema" and out.text.format.name == "sum"
    assert _events(client, max_output_tokens=40, text=text)[-1].response.output_text == out.output_text
    # json_object: any JSON object (SmolLM2's run on past a short budget, so its opening is what is checked)
    assert _create(client, max_output_tokens=3, text={"format": {"type": "json_object"}}).output_text.startswith("{")
    assert not _create(client, max_output_tokens=3).output_text.startswith("{")


def test_a_named_function_tool_answers_a_function_call_item(client):
    """Responses' flat tool, named in tool_choice: one function_call item whose arguments follow its schema, as chat's
    tool_calls say (ids aside); streamed, the arguments' deltas join to the same call."""
    ask = "What is the weather like in Paris today?"
    out = _create(client, input=ask, tools=[TOOL], tool_choice=NAMED, max_output_tokens=60)
    [call] = out.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    chat = _chat(client, [{"role": "user", "content": ask}], tools=[CHAT_TOOL], max_tokens=60,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert call.arguments == chat.choices[0].message.tool_calls[0].function.arguments
    assert out.tool_choice.name == "get_weather" and out.tools[0].name == "get_weather"
    events = _events(client, input=ask, tools=[TOOL], tool_choice=NAMED, max_output_tokens=60)
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    joined = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert joined == events[-3].arguments == call.arguments and _items(events[-1].response) == _items(out)
    assert events[-1].response.output[0].call_id == events[2].item.call_id


TIME = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
# SmolLM2 writes no Hermes blocks of itself: a regular expression makes it write text, then two calls
TEXT_AND_TWO_CALLS = (r'Checking\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,10}", '
                      r'"unit": "(celsius|fahrenheit)"\}\}</tool_call>\n<tool_call>\{"name": "get_time", '
                      r'"arguments": \{"timezone": "[A-Z][a-z]{2,8}/[A-Z][a-z]{2,8}"\}\}</tool_call>')


def test_hermes_calls_stream_as_items_whose_deltas_join_to_the_unstreamed_response(client):
    """tool_choice "auto" with --tool-call-parser hermes, where chat streams each call's arguments as written: the
    text before the calls is a message item, closed before the first call opens; each call's item is added with
    its call_id and name, its arguments come in many deltas at its own output_index, and join to its .done and to
    the unstreamed response's call."""
    body = {"input": "What is the weather like in Paris today?", "max_output_tokens": 150,
            "tools": [TOOL, {"type": "function", "name": "get_time", "parameters": TIME}],
            "extra_body": {"structured_outputs": {"regex": TEXT_AND_TWO_CALLS}}}
    whole = _create(client, **body)
    assert [i.type for i in whole.output] == ["message", "function_call", "function_call"], whole.output
    assert whole.output[0].content[0].text == "Checking. " and whole.status == "completed"
    events = _events(client, **body)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    items = [(e.type, e.output_index) for e in events if e.type.startswith("response.output_item")]
    assert items == [("response.output_item.added", 0), ("response.output_item.done", 0),
                     ("response.output_item.added", 1), ("response.output_item.done", 1),
                     ("response.output_item.added", 2), ("response.output_item.done", 2)]
    done = events[-1].response
    assert events[-1].type == "response.completed" and _items(done) == _items(whole)
    for index in (1, 2):
        [added] = [e for e in events if e.type == "response.output_item.added" and e.output_index == index]
        assert added.item.call_id == done.output[index].call_id and added.item.name == whole.output[index].name
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"
                  and e.output_index == index]
        [end] = [e for e in events if e.type == "response.function_call_arguments.done" and e.output_index == index]
        assert len(deltas) > 5 and "".join(deltas) == end.arguments == whole.output[index].arguments
        assert {e.item_id for e in events if getattr(e, "output_index", None) == index and hasattr(e, "item_id")} \
            == {done.output[index].id}


def test_a_function_call_output_continues_the_conversation_as_chat(client):
    """function_call and function_call_output items are chat's assistant tool_calls and tool message."""
    args = '{"city": "Paris", "unit": "celsius"}'
    items = [{"role": "user", "content": "What is the weather like in Paris today?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": args},
             {"type": "function_call_output", "call_id": "call_1", "output": "22 degrees and sunny"}]
    out = _create(client, input=items, tools=[TOOL], tool_choice="none", max_output_tokens=20)
    chat = _chat(client, [items[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"}], tools=[CHAT_TOOL],
        tool_choice="none", max_tokens=20)
    assert out.output_text == chat.choices[0].message.content
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    without = _create(client, input=items[:1], tools=[TOOL], tool_choice="none", max_output_tokens=20)
    assert without.usage.input_tokens < out.usage.input_tokens  # the call and its output reached the prompt
    _, call, result = client.responses.input_items.list(out.id, order="asc").data  # listed as sent, with ids
    assert (call.type, call.call_id, call.name, call.arguments) == ("function_call", "call_1", "get_weather", args)
    assert (result.type, result.call_id, result.output) == ("function_call_output", "call_1", "22 degrees and sunny")
    assert call.id.startswith("fc_") and result.id and result.id != call.id


def test_policy_applies_as_on_chat(client, http):
    messages = [{"role": "user", "content": ASK}]
    for policy in ("skip:8-11", "pairs"):
        out = _create(client, extra_body={"policy": policy})
        chat = _chat(client, messages, extra_body={"policy": policy})
        assert out.output_text == chat.choices[0].message.content, policy
        r = http.post("/v1/responses", json={"model": f"{MODEL}@{policy}", "input": ASK, "temperature": 0,
                                             "max_output_tokens": 24})
        assert r.json()["output"][0]["content"][0]["text"] == out.output_text
        assert r.headers["x-painters-policy"] == r.json()["painters"]["policy"] == chat.painters["policy"]
        assert r.json()["painters"]["schedule"] != _create(client).painters["schedule"]  # not the full model


def test_a_response_counts_in_the_metrics_under_its_policy(http):
    def success() -> float:
        return metric_value(http.get("/metrics").text, "painters:request_success_total", model=MODEL,
                            policy="skip:12-16")
    before = success()
    r = http.post("/v1/responses", json={"input": ASK, "max_output_tokens": 2, "temperature": 0, "policy": "skip:5"})
    assert r.status_code == 200 and r.json()["painters"]["policy"] == "skip:12-16"  # canonical
    wait_until(lambda: success() == before + 1, timeout=10, what="the response counted")


def test_a_client_that_leaves_a_stream_aborts_it(http):
    def counts() -> tuple[float, float]:
        text = http.get("/metrics").text
        return (metric_value(text, "painters:request_success_total", model=MODEL, finished_reason="abort"),
                metric_value(text, "painters:num_requests_running", model=MODEL))
    before, _ = counts()
    body = {"input": "Tell me a long story.", "max_output_tokens": 400, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        deltas = 0
        for line in r.iter_lines():
            deltas += line == "event: response.output_text.delta"
            if deltas == 2:
                break
    wait_until(lambda: counts() == (before + 1, 0), timeout=60, what="the abandoned response is aborted")


@pytest.mark.parametrize("body,param,says", [
    ({"tools": [{"type": "web_search"}]}, "tools", ("only function tools", "web_search")),
    ({"background": True, "store": False}, "background", ("needs store true",)),
    ({"reasoning": {"effort": "high"}}, "reasoning", ("does not reason",)),
    ({"include": ["reasoning.encrypted_content"]}, "include", ("does not apply", "message.output_text.logprobs")),
    ({"top_logprobs": 2}, None, ("needs include",)),
    ({"top_logprobs": 21, "include": ["message.output_text.logprobs"]}, "top_logprobs", ("[0, 20]",)),
    ({"include": ["message.output_text.logprobs"], "tools": [TOOL], "tool_choice": NAMED}, None, ("not with tools",)),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", ("message, function_call, "
                                                                        "function_call_output",)),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input",
     ("'input_text' or 'output_text'",)),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", ("not among tools",)),
    ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice", ('"required" or {"type": "function"',)),
    ({"tools": [TOOL], "tool_choice": NAMED, "text": {"format": {"type": "json_object"}}}, None, ("text.format",)),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text", ("needs schema",)),
    ({"temperature": -1}, "temperature", ("[0, 100]",)),
    ({"max_output_tokens": 0}, "max_output_tokens", ("greater than or equal to 1",)),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", ("at most 16",)),
    ({"truncation": "auto"}, "truncation", ("'disabled'",)),
    ({"policy": "bogus"}, "policy", ("allowed forms",)),
    ({"input": []}, "input", ("at least 1",)),
])
def test_bad_requests_are_400s_naming_what_is_allowed(http, body, param, says):
    r = http.post("/v1/responses", json={"model": MODEL, "input": ASK, "max_output_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert (err["param"] or "").startswith(param), err
    for fragment in says:
        assert fragment in err["message"], (fragment, err["message"])


def test_the_openapi_schema_describes_responses(http):
    spec = http.get("/openapi.json").json()
    assert "/v1/responses" in spec["paths"]
    properties = spec["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"input", "instructions", "max_output_tokens", "text", "tools", "tool_choice", "policy",
            "background"} <= set(properties)
    assert "queued" in spec["components"]["schemas"]["ResponseObject"]["properties"]["status"]["enum"]
    paths = spec["paths"]
    assert "post" in paths["/v1/responses/{response_id}/cancel"]
    listing = paths["/v1/responses/{response_id}/input_items"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"response_id", "limit", "order", "after", "include"}
    assert {p["name"] for p in paths["/v1/responses/{response_id}"]["get"]["parameters"]} == {
        "response_id", "stream", "starting_after"}
    assert "no response kept" in listing["responses"]["404"]["description"]


def test_a_stored_response_is_continued_got_and_deleted(client, http):
    """With the server's store (PAINTERS_RESPONSES_STORE), previous_response_id continues a kept conversation as if
    it were sent whole (its instructions do not carry over, OpenAI's rule); GET answers the kept response, DELETE
    forgets it; store=false keeps nothing; beyond the bound the least recently used go."""
    first = _create(client, input=[{"role": "user", "content": "My name is Ada."}], instructions="Be terse.",
                    max_output_tokens=12)
    assert first.store is True
    follow = _create(client, input="What is my name?", previous_response_id=first.id, max_output_tokens=12)
    whole = _create(client, max_output_tokens=12, input=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert follow.output_text == whole.output_text and follow.usage.input_tokens == whole.usage.input_tokens
    assert follow.previous_response_id == first.id and follow.instructions is None
    got = client.responses.retrieve(first.id)
    assert got.model_dump() == first.model_dump()
    client.responses.delete(first.id)
    for r in (http.get(f"/v1/responses/{first.id}"), http.delete(f"/v1/responses/{first.id}"),
              http.post("/v1/responses", json={"input": "x", "previous_response_id": first.id})):
        assert r.status_code == 404 and "not found" in r.json()["error"]["message"], r.text
    streamed = _events(client, max_output_tokens=2)[-1].response
    assert streamed.store is True and client.responses.retrieve(streamed.id).output_text == streamed.output_text
    unkept = _create(client, store=False, max_output_tokens=1)
    assert unkept.store is False and http.get(f"/v1/responses/{unkept.id}").status_code == 404
    kept = [_create(client, max_output_tokens=1).id for _ in range(STORE_MAX + 1)]
    assert http.get(f"/v1/responses/{kept[0]}").status_code == 404  # evicted
    assert all(http.get(f"/v1/responses/{k}").status_code == 200 for k in kept[1:])


def test_a_server_without_a_store_refuses_previous_response_id_and_background():
    with serve_tiny() as url:
        r = httpx.post(f"{url}/v1/responses", json={"input": "x", "previous_response_id": "resp_1"})
        assert r.status_code == 400 and "PAINTERS_RESPONSES_STORE" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{url}/v1/responses", json={"input": "x", "background": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "background", r.text
        assert "PAINTERS_RESPONSES_STORE" in r.json()["error"]["message"]
        for path in ("", "/input_items"):
            assert httpx.get(f"{url}/v1/responses/resp_1{path}").status_code == 404
        assert httpx.post(f"{url}/v1/responses/resp_1/cancel").status_code == 404


def test_fields_sent_at_a_value_that_asks_for_nothing_are_accepted(http):
    """Clients send OpenAI's fields at their neutral values (a reasoning object of nulls, background false, include
    empty, truncation disabled): those are not refusals."""
    r = http.post("/v1/responses", json={"input": ASK, "max_output_tokens": 1, "reasoning": {"effort": None},
                                         "background": False, "include": [], "truncation": "disabled",
                                         "service_tier": "auto", "store": False, "stream_options": None})
    assert r.status_code == 200, r.text


# -- background responses, cancel, input items -------------------------------------------------------------------------

LONG = {"input": "Tell me a long story.", "max_output_tokens": 400, "extra_body": {"ignore_eos": True}}


def _finished(client: openai.OpenAI, rid: str, timeout: float = 60) -> Any:
    """The background response `rid` polled until it is no longer queued or in progress."""
    got: list[Any] = []
    wait_until(lambda: got.append(client.responses.retrieve(rid)) or got[-1].status not in ("queued", "in_progress"),
               timeout=timeout, what="the background response finished", interval=0.1)
    return got[-1]


def _idle(http: httpx.Client) -> bool:
    text = http.get("/metrics").text
    return (metric_value(text, "painters:num_requests_running", model=MODEL) == 0
            and metric_value(text, "painters:num_requests_waiting", model=MODEL) == 0)


def test_a_background_response_is_answered_at_once_and_polled_to_the_foreground_answer(client):
    queued = _create(client, background=True)
    assert queued.background is True and queued.status in ("queued", "in_progress") and queued.output == []
    assert queued.store is True and queued.usage is None
    done = _finished(client, queued.id)
    whole = _create(client)
    assert done.status == "completed" and done.background is True and done.id == queued.id
    assert done.output_text == whole.output_text and "4" in done.output_text and _items(done) == _items(whole)
    assert done.usage.output_tokens == whole.usage.output_tokens and done.completed_at is not None
    cut = _finished(client, _create(client, background=True, input="Tell me a long story.", max_output_tokens=5).id)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_cancelling_a_running_background_response_aborts_its_engine_request(client, http):
    """Cancel while in progress: the response is cancelled (and stays so), its engine request aborted (nothing
    left running or waiting); cancelling it again answers it again (OpenAI's cancel is idempotent); a finished
    background response, a foreground one and an unknown id are refused."""
    def aborted() -> float:
        return metric_value(http.get("/metrics").text, "painters:request_success_total", model=MODEL,
                            finished_reason="abort")
    before = aborted()
    running = _create(client, background=True, **LONG)
    wait_until(lambda: client.responses.retrieve(running.id).status == "in_progress", timeout=30,
               what="the background response runs", interval=0.05)
    cancelled = client.responses.cancel(running.id)
    assert cancelled.status == "cancelled" and cancelled.id == running.id and cancelled.background is True
    wait_until(lambda: _idle(http) and aborted() == before + 1, timeout=10, what="its engine request aborted")
    time.sleep(0.3)  # nothing overwrites it later
    assert client.responses.retrieve(running.id).status == "cancelled"
    assert client.responses.cancel(running.id).status == "cancelled"
    finished = _finished(client, _create(client, background=True).id)
    foreground = _create(client)
    for rid, says in ((finished.id, "already completed"), (foreground.id, "only a background response")):
        r = http.post(f"/v1/responses/{rid}/cancel")
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
        assert client.responses.retrieve(rid).status == "completed"
    r = http.post("/v1/responses/resp_nope/cancel")
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    deleted = _create(client, background=True, **LONG)  # deleting a running one cancels it: it is not kept again
    client.responses.delete(deleted.id)
    wait_until(lambda: _idle(http) and aborted() == before + 2, timeout=10, what="the deleted one aborted")
    assert http.get(f"/v1/responses/{deleted.id}").status_code == 404


def test_a_background_stream_streams_and_streams_again_from_any_event(client, http):
    """background with stream (vLLM's): the events as a foreground stream's, opening queued; GET ?stream=true
    replays them, from after starting_after; a response not streamed in the background has none to stream."""
    events = _events(client, background=True)
    kinds = [e.type for e in events]
    assert kinds[:4] == TEXT_EVENTS and kinds[-1] == "response.completed"
    assert events[0].response.status == "queued" and events[0].response.background is True
    done = events[-1].response
    assert done.output_text == _create(client).output_text == client.responses.retrieve(done.id).output_text
    with client.responses.retrieve(done.id, stream=True, starting_after=3) as again:
        replayed = list(again)
    assert [e.sequence_number for e in replayed] == list(range(4, len(events)))
    assert [e.model_dump() for e in replayed] == [e.model_dump() for e in events[4:]]
    r = http.get(f"/v1/responses/{_create(client, max_output_tokens=1).id}", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text


def test_input_items_page_what_was_sent_and_a_chains_whole_context(client, http):
    """OpenAI's list: newest first by default, `limit` per page, `after` an item id, has_more, first_id/last_id;
    items as OpenAI lists them (text as input_text parts; instructions are none). A continued response lists the
    previous one's items and output, then its own input."""
    sent = [{"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada."}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Remember it."}]}]
    first = _create(client, input=sent, instructions="Be terse.", max_output_tokens=4)
    asc = client.responses.input_items.list(first.id, order="asc")
    assert [(i.type, i.role, [p.text for p in i.content]) for i in asc.data] == [
        ("message", "user", ["My name is Ada."]), ("message", "assistant", ["Hello Ada."]),
        ("message", "user", ["Remember it."])]
    assert [p.type for i in asc.data for p in i.content] == ["input_text", "output_text", "input_text"]
    assert len({i.id for i in asc.data}) == 3 and not asc.has_more
    assert (asc.first_id, asc.last_id) == (asc.data[0].id, asc.data[-1].id)
    desc = client.responses.input_items.list(first.id)  # OpenAI's default order: desc
    assert [i.id for i in desc.data] == [i.id for i in reversed(asc.data)]
    page = client.responses.input_items.list(first.id, order="asc", limit=2)
    assert [i.id for i in page.data] == [i.id for i in asc.data[:2]] and page.has_more
    rest = client.responses.input_items.list(first.id, order="asc", limit=2, after=page.last_id)
    assert [i.id for i in rest.data] == [asc.data[2].id] and not rest.has_more
    assert [i.id for i in client.responses.input_items.list(first.id, limit=1, after=desc.data[0].id).data] == \
        [asc.data[1].id]
    follow = _create(client, input="What is my name?", previous_response_id=first.id, max_output_tokens=4)
    chain = client.responses.input_items.list(follow.id, order="asc")
    assert [i.id for i in chain.data] == [*(i.id for i in asc.data), first.output[0].id, chain.data[-1].id]
    assert chain.data[3].content[0].text == first.output_text and chain.data[4].content[0].text == "What is my name?"
    assert client.responses.input_items.list(follow.id, include=["message.output_text.logprobs"]).data
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "up"}, "order"),
                          ({"after": "msg_nope"}, "after"), ({"include": "bogus"}, "include")):
        r = http.get(f"/v1/responses/{first.id}/input_items", params=params)
        assert r.status_code == 400 and param in r.json()["error"]["param"], (params, r.text)
    assert http.get("/v1/responses/resp_nope/input_items").status_code == 404



def test_background_responses_are_bounded_and_never_evicted_while_running(client, http):
    """At most responses_background_max run at once (beyond, a 429 as a full queue's); running ones outlast the
    store's bound (STORE_MAX kept) however many finished ones come after them."""
    running = [_create(client, background=True, **LONG) for _ in range(BACKGROUND_MAX)]
    r = http.post("/v1/responses", json={"input": ASK, "background": True, "max_output_tokens": 2})
    assert r.status_code == 429 and "responses_background_max 2" in r.json()["error"]["message"], r.text
    assert r.headers["retry-after"] == "1"
    for _ in range(STORE_MAX + 1):
        _create(client, max_output_tokens=1)
    assert all(client.responses.retrieve(b.id).status in ("queued", "in_progress") for b in running)
    for b in running:
        assert client.responses.cancel(b.id).status == "cancelled"
    assert _finished(client, _create(client, background=True, max_output_tokens=2).id).status == "incomplete"
    wait_until(lambda: _idle(http), timeout=10, what="nothing left running")


def test_a_drain_cancels_background_responses_and_the_server_exits_cleanly(tmp_path):
    """SIGTERM: a background response still running at the drain deadline ends cancelled (its stream's last event
    says so) and its engine request with it; the server exits 0, leaving no task behind."""
    env = {"PAINTERS_RESPONSES_STORE": "true", "PAINTERS_DRAIN_TIMEOUT_S": "1"}
    with painters_server(tmp_path, env=env) as p:
        body = {"model": MODEL, "input": "Tell me a long story.", "max_output_tokens": 400, "ignore_eos": True,
                "background": True, "stream": True}
        with httpx.stream("POST", f"{p.url}/v1/responses", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line == "event: response.output_text.delta":
                    break
            p.proc.send_signal(signal.SIGTERM)
            last = [json.loads(line[6:]) for line in lines if line.startswith("data: ")][-1]
        assert last["response"]["status"] == "cancelled" and last["response"]["background"] is True, last
        assert p.proc.wait(timeout=30) == 0
        log = p.log.read_text()
        assert "Traceback" not in log and "was destroyed but it is pending" not in log, log[-3000:]
