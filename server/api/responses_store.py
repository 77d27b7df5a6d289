"""The responses kept for previous_response_id and GET/DELETE /v1/responses/{id}: in memory, as vLLM keeps them
(its response_store and msg_store, behind VLLM_ENABLE_RESPONSES_API_STORE), but bounded in count and in bytes, the
least recently used evicted first (vLLM's grows without end). Each entry holds the response and the conversation
that led to it, its output included, as chat messages: what a next turn continues."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from server.api.responses_protocol import ResponseObject


@dataclass(frozen=True)
class Stored:
    response: ResponseObject
    messages: list[dict[str, Any]]  # the conversation, instructions left out (they do not carry over: OpenAI's rule)
    size: int  # bytes of both, as JSON


class ResponseStore:
    def __init__(self, *, max_responses: int, max_bytes: int) -> None:
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._entries: OrderedDict[str, Stored] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: ResponseObject, messages: list[dict[str, Any]]) -> bool:
        """Keep `response`, evicting the least recently used beyond the bounds; False (not kept) when it alone is
        larger than the byte bound."""
        size = len(response.model_dump_json()) + len(json.dumps(messages))
        if size > self.max_bytes:
            return False
        self.delete(response.id)
        self._entries[response.id] = Stored(response, messages, size)
        self.bytes += size
        while len(self._entries) > self.max_responses or self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.size
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
