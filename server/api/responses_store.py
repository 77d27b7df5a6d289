"""The responses kept for previous_response_id, GET/DELETE /v1/responses/{id}, background responses and their input
items: in memory, as vLLM keeps them (its response_store and msg_store, behind VLLM_ENABLE_RESPONSES_API_STORE), but
bounded in count and in bytes, the least recently used evicted first (vLLM's grows without end). Each entry holds the
response, the conversation that led to it, its output included, as chat messages (what a next turn continues), the
input items it was answered from, as GET .../input_items lists them, and a background stream's events. A background
response still running (queued or in progress) is not evicted: it is bounded by the number that may run at once
(responses_background_max), and its end is kept in its place."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from server.api.responses_protocol import LIVE, ListedItem, ResponseObject

_ITEMS = TypeAdapter(list[ListedItem])


@dataclass(frozen=True)
class Stored:
    response: ResponseObject
    messages: list[dict[str, Any]]  # the conversation, instructions left out (they do not carry over: OpenAI's rule)
    size: int  # bytes of all four, as JSON
    items: list[ListedItem] = field(default_factory=list)  # the input items, a previous response's chain first
    events: list[dict[str, str]] = field(default_factory=list)  # a background stream's events, to stream again


class ResponseStore:
    def __init__(self, *, max_responses: int, max_bytes: int) -> None:
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._entries: OrderedDict[str, Stored] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: ResponseObject, messages: list[dict[str, Any]], *, items: Sequence[ListedItem] = (),
            events: Sequence[dict[str, str]] = ()) -> bool:
        """Keep `response` (in place of an entry of the same id), evicting the least recently used finished ones
        beyond the bounds; False (not kept) when it alone is larger than the byte bound."""
        items, events = list(items), list(events)
        size = (len(response.model_dump_json()) + len(json.dumps(messages)) + len(_ITEMS.dump_json(items))
                + sum(len(e["data"]) for e in events))
        if size > self.max_bytes:
            return False
        self.delete(response.id)
        self._entries[response.id] = Stored(response, messages, size, items, events)
        self.bytes += size
        finished = [rid for rid, e in self._entries.items() if e.response.status not in LIVE and rid != response.id]
        for rid in finished:
            if len(self._entries) <= self.max_responses and self.bytes <= self.max_bytes:
                break
            self.delete(rid)
        return True

    def get(self, response_id: str) -> Stored | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry is not None
