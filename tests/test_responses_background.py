"""Background responses' tasks and recorded streams (server/api/responses_background.py), without a model: the bound
on how many run, a cancel that ends the task and then the response (whether or not the task had begun), the
server's stop cancelling every one left, and a recording replayed from any point to readers that join late."""

from __future__ import annotations

import asyncio

import pytest

from server.api.errors import APIError
from server.api.responses_background import BackgroundTasks, Recording


async def _forever(began: list[str], rid: str) -> None:
    began.append(rid)
    await asyncio.Event().wait()


def test_at_most_limit_run_and_a_cancel_ends_the_task_then_the_response():
    async def main() -> None:
        tasks, began, ended = BackgroundTasks(limit=2), [], []
        for rid in ("a", "b"):
            tasks.check_room()
            tasks.start(rid, _forever(began, rid), on_cancel=lambda rid=rid: ended.append(rid), recording=None)
        with pytest.raises(APIError) as e:
            tasks.check_room()
        assert e.value.status == 429 and "responses_background_max 2" in e.value.message
        await asyncio.sleep(0)
        await tasks.cancel("a")
        assert ended == ["a"] and len(tasks) == 1 and began == ["a", "b"]
        await tasks.cancel("nope")  # not running: nothing to do
        tasks.check_room()
    asyncio.run(main())


def test_the_servers_stop_cancels_every_one_left_even_one_not_begun():
    async def main() -> None:
        tasks, began, ended = BackgroundTasks(limit=4), [], []
        recording = Recording(policy="full")
        tasks.start("a", _forever(began, "a"), on_cancel=lambda: ended.append("a"), recording=recording)
        await asyncio.sleep(0)
        tasks.start("b", _forever(began, "b"), on_cancel=lambda: ended.append("b"), recording=None)  # not begun
        assert tasks.recordings == {"a": recording}
        await tasks.close()
        assert sorted(ended) == ["a", "b"] and began == ["a"] and len(tasks) == 0 and tasks.recordings == {}
    asyncio.run(main())


def test_a_recording_replays_from_any_point_and_follows_until_it_closes():
    async def main() -> None:
        recording = Recording(policy="full")
        for i in range(3):
            recording.add({"event": "e", "data": str(i)})

        async def read(after: int | None) -> list[str]:
            return [e["data"] async for e in recording.replay(after=after)]
        late = asyncio.ensure_future(read(1))
        whole = asyncio.ensure_future(read(None))
        await asyncio.sleep(0.01)
        assert not late.done()  # still following
        recording.add({"event": "e", "data": "3"})
        recording.close()
        assert await late == ["2", "3"] and await whole == ["0", "1", "2", "3"]
        assert await read(3) == [] and await read(-1) == ["0", "1", "2", "3"]
    asyncio.run(main())
