"""The kept responses (server/api/responses_store.py): bounded in count and bytes, least recently used evicted first,
a response larger than the whole bound not kept, a background response still running never evicted, input items and
a background stream's events counted in the bytes. No model: hand-made responses."""

from __future__ import annotations

from server.api.responses_protocol import (
    InputMessage, InputText, OutputMessage, OutputText, ResponseObject, Status, TextConfig,
)
from server.api.responses_store import ResponseStore


def _response(rid: str, text: str = "hi", status: Status = "completed") -> ResponseObject:
    return ResponseObject(id=rid, created_at=0, status=status, instructions=None, max_output_tokens=None,
                          max_tool_calls=None, metadata={}, model="m", previous_response_id=None,
                          output=[OutputMessage(id="msg_1", status="completed", content=[OutputText(text=text)])],
                          parallel_tool_calls=True, temperature=1.0, text=TextConfig(), tool_choice="auto", tools=[],
                          top_p=1.0, user=None)


def test_the_least_recently_used_go_beyond_the_count():
    store = ResponseStore(max_responses=2, max_bytes=2**20)
    for rid in ("a", "b"):
        assert store.put(_response(rid), [{"role": "user", "content": rid}])
    assert store.get("a") is not None  # a is now the most recently used
    store.put(_response("c"), [])
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None and len(store) == 2


def test_the_bytes_are_bounded_and_counted_back_on_delete():
    one = _response("a", "x" * 1000)
    size = len(one.model_dump_json()) + len("[]") * 2  # no messages, no items
    store = ResponseStore(max_responses=100, max_bytes=2 * size + 10)
    for rid in "abc":
        assert store.put(_response(rid, "x" * 1000), [])
    assert len(store) == 2 and store.get("a") is None and store.bytes <= store.max_bytes
    assert store.delete("b") and not store.delete("b") and store.bytes == size
    assert not store.put(_response("huge", "x" * 3 * size), []) and store.get("huge") is None  # larger than all
    store.put(_response("c", "y"), [])  # kept again under the same id: counted once
    assert len(store) == 1 and store.bytes == len(_response("c", "y").model_dump_json()) + 4  # [] and no items


def test_running_background_responses_are_never_evicted():
    store = ResponseStore(max_responses=2, max_bytes=2**20)
    store.put(_response("live", status="in_progress"), [])
    store.put(_response("queued", status="queued"), [])
    for rid in "abc":
        assert store.put(_response(rid), [])
    assert store.get("live") is not None and store.get("queued") is not None and store.get("c") is not None
    assert store.get("a") is None and store.get("b") is None  # finished ones go first, down to the newest
    store.put(_response("live"), [])  # it finished: now it may go
    store.put(_response("d"), [])
    assert store.get("queued") is not None and len(store) == 2


def test_input_items_and_events_count_in_the_bytes():
    store = ResponseStore(max_responses=100, max_bytes=2**20)
    store.put(_response("a"), [])
    bare = store.bytes
    items = [InputMessage(id="msg_1", role="user", content=[InputText(text="x" * 500)])]
    store.put(_response("a"), [], items=items, events=[{"event": "e", "data": "y" * 300}])
    assert store.bytes > bare + 800 and store.get("a").items == items
    small = ResponseStore(max_responses=100, max_bytes=2 * bare + 10)  # room for two bare ones, not one with items
    assert not small.put(_response("a"), [], items=items * 10) and small.get("a") is None
