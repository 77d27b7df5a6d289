"""Background responses (POST /v1/responses with background: true), as vLLM runs them (serving.py's background_tasks
and event_store): each one an asyncio task on the event loop that reads its engine request's outputs (the engine loop
runs it as any other) and keeps what it answers; at most `limit` at once (beyond, a 429 as a full queue's);
cancelled by id (the task's end aborts its engine request, as a client that leaves does); all cancelled when the
server stops. A streamed one's events are recorded, for the POST's stream and for GET ?stream=true to replay from
any point."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from server.api.errors import APIError

log = logging.getLogger(__name__)


class Recording:
    """A background stream's events (server-sent event dicts) as they come, read by any number of readers."""

    def __init__(self, *, policy: str) -> None:
        self.policy = policy  # the canonical policy it runs under (the stream's x-painters-policy)
        self.events: list[dict[str, str]] = []
        self.closed = False
        self._grew = asyncio.Event()

    def add(self, event: dict[str, str]) -> None:
        self.events.append(event)
        self._grew.set()

    def close(self) -> None:
        self.closed = True
        self._grew.set()

    async def replay(self, *, after: int | None = None) -> AsyncIterator[dict[str, str]]:
        """The events numbered after `after` (all when None), then each new one, until the recording closes."""
        index = 0 if after is None else after + 1
        while True:
            self._grew.clear()
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.closed:
                return
            await self._grew.wait()


class BackgroundTasks:
    """The running background responses' tasks, by response id."""

    def __init__(self, *, limit: int) -> None:
        self.limit = limit
        self._tasks: dict[str, tuple[asyncio.Task[None], Callable[[], None]]] = {}
        self.recordings: dict[str, Recording] = {}  # a running streamed one's events

    def __len__(self) -> int:
        return len(self._tasks)

    def check_room(self) -> None:
        if len(self._tasks) >= self.limit:
            raise APIError(429, f"server busy: {len(self._tasks)} background responses already running "
                                f"(responses_background_max {self.limit}); retry later, or cancel one",
                           headers={"Retry-After": "1"}, code="queue_full")

    def start(self, response_id: str, work: Coroutine[Any, Any, None], *, on_cancel: Callable[[], None],
              recording: Recording | None) -> None:
        """Run `work`; `on_cancel` ends the response when it is cancelled (whether or not the task began)."""
        task = asyncio.get_running_loop().create_task(work, name=f"response-{response_id}")
        self._tasks[response_id] = task, on_cancel
        if recording is not None:
            self.recordings[response_id] = recording

        def ended(t: asyncio.Task[None]) -> None:
            self._tasks.pop(response_id, None)
            self.recordings.pop(response_id, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("background response %s failed", response_id, exc_info=t.exception())
        task.add_done_callback(ended)

    async def cancel(self, response_id: str) -> None:
        """Cancel the response's task and wait for it to end: its engine request aborted, its end kept."""
        entry = self._tasks.get(response_id)
        if entry is not None:
            await self._cancel([entry])

    async def close(self) -> None:
        """The server stops: every background response still running is cancelled."""
        entries = list(self._tasks.values())
        if entries:
            log.warning("shutdown: %d background response(s) cancelled", len(entries))
            await self._cancel(entries)

    @staticmethod
    async def _cancel(entries: list[tuple[asyncio.Task[None], Callable[[], None]]]) -> None:
        for task, _ in entries:
            task.cancel()
        await asyncio.gather(*(task for task, _ in entries), return_exceptions=True)
        for _, on_cancel in entries:
            on_cancel()
