"""The KV manager on its own: reservations, the prefix-cache memory bound, rollback by n tokens."""

from __future__ import annotations

import pytest

from server.policy.compiler import compile_schedule
from server.engine.kv_manager import KVManager
from server.policy.policy import as_policy
from server.engine.request import Request
from server.engine.sampling import SamplingParams


def test_reservation_is_slots_times_blocks_of_prompt_plus_max_tokens():
    kv = KVManager(num_blocks=10, block_size=4)
    r = Request("a", [1] * 6, SamplingParams(max_tokens=3), compile_schedule(as_policy("skip:1"), 3))  # 2 slots
    assert kv.reservation(r) == 2 * 3  # ceil(9 / 4) blocks per slot
    probe = Request("p", [], SamplingParams(), compile_schedule(as_policy("full"), 2), probe_prompts=[[1] * 5, [1]])
    assert kv.reservation(probe) == 2 * (2 + 1)  # each prompt in its own blocks
    kv.reserve(r)
    assert kv.reserved_blocks == 6 and not kv.can_reserve(r), "a second one would need 12 of 10 blocks"
    kv.free("a")
    assert kv.reserved == {}


@pytest.mark.parametrize("overlap", [False, True], ids=["stepwise", "overlapped"])
@pytest.mark.parametrize("ended", [False, True], ids=["running", "ended-by-its-last-token"])
def test_rollback_forgets_tokens_and_decoding_resumes_exactly(tiny_engine, overlapped_engine, overlap, ended):
    """Decode 8 tokens; elsewhere decode 7 (or to the stop string that the 8th completes), roll back 3, decode on:
    the same tokens (greedy), text and per-token times, and the rolled back request holds only the blocks its tokens
    use. Overlapped, the rollback first reads the step in flight. An end that a rolled back token brought is undone."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    plain = tiny_engine.generate([[5, 6, 7, 8, 9]], params=params)[0]
    want = plain.token_ids
    if ended:  # a stop string that only the 8th token completes: the whole text
        params = SamplingParams(max_tokens=8, ignore_eos=True, stop=[plain.text])
    engine = overlapped_engine if overlap else tiny_engine
    batch = engine.new_batch(max_len=32, num_blocks=64, block_size=2)
    r = tiny_engine.new_sequence([5, 6, 7, 8, 9], params, tiny_engine.compile("skip:2"))
    batch.add([r])
    full = tiny_engine.new_sequence([5, 6, 7, 8, 9], params, tiny_engine.compile("full"))
    batch.add([full])
    for _ in range(7 if ended else 6):
        batch.step()
    if ended:
        batch.settle()
        assert full.finish_reason == "stop" and full.text == "" and full.output_ids == want
    else:
        assert full.output_ids == want[: 7 - overlap]  # overlapped, the 7th is in flight
    held = batch.kv.used_blocks
    batch.rollback(full, 3)
    kept = want[: 5 if ended else 4]
    assert full.output_ids == kept and len(full.logprobs) == len(kept) and not full.finished
    assert full.text == tiny_engine.tokenizer.decode(kept) and len(full.timings.per_token_s) == len(kept) - 1
    assert batch.kv.used_blocks < held, "blocks past the kept tokens went back to the pool"
    while not full.finished:
        batch.step()
    assert full.output_ids == want and len(full.timings.per_token_s) == len(want) - 1
    assert full.text == ("" if ended else plain.text) and full.finish_reason == ("stop" if ended else "length")


def test_prefix_only_blocks_stay_under_their_bound(tiny_engine):
    """Many distinct prompts, each registered and ended: the blocks kept only for reuse never exceed the cap, and the
    most recent prompt is still found."""
    batch = tiny_engine.new_batch(max_len=32, num_blocks=400, block_size=4, prefix_caching=True, prefix_blocks=12)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    schedule = tiny_engine.compile("full")  # 6 slots: a 9-token prompt registers 3 blocks x 6 slots
    for i in range(20):
        r = tiny_engine.new_sequence([3 + i, 4, 5, 6, 7, 8, 9, 10, 11], params, schedule)
        batch.add([r])
        batch.filter()
        assert batch.kv.prefix_only_blocks <= 12
    again = tiny_engine.new_sequence([3 + 19, 4, 5, 6, 7, 8, 9, 10, 11], params, schedule)
    before = batch.reused_tokens
    batch.add([again])
    assert batch.reused_tokens > before, "the latest prompt survived eviction"


def test_rolling_back_every_token_is_refused(tiny_engine):
    """The next step decodes from the last token kept; with none kept it failed with an IndexError there."""
    batch = tiny_engine.new_batch(max_len=32, num_blocks=64, block_size=2)
    r = tiny_engine.new_sequence([5, 6, 7, 8, 9], SamplingParams(max_tokens=8, ignore_eos=True),
                                 tiny_engine.compile("full"))
    batch.add([r])
    batch.step()
    with pytest.raises(AssertionError, match="keep one"):
        batch.rollback(r, len(r.output_ids))
    batch.rollback(r, len(r.output_ids) - 1)
    batch.step()
    assert len(r.output_ids) == 2
