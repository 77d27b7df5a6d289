"""The KV manager: the one owner of KV block arithmetic, reservations, prefix reuse, its memory bound, and rollback.

The scheduler asks it whether a request fits (`reservation`, `can_reserve`) and tells it when one starts and ends
(`reserve`, `free`); the batch asks it what of a prompt is cached (`reuse`) and to publish a computed prompt
(`register`). Blocks themselves live in the paged pool (`server.engine.kv_cache.PagedKVCache`), which the executor reads and
writes; only this class decides what the pool holds.

Reservations: a running request holds, from admission on, the blocks its whole length needs under its schedule
(slots x ceil((prompt + max_tokens) / block size)), so it never runs out of cache mid-decode.

Prefix memory bound: blocks kept only for prefix reuse (registered, held by no request) are capped at
`prefix_blocks` (a share of the pool by default); when a request ends, least recently used entries beyond the cap
are evicted, so resident memory stops at (blocks in use) + cap instead of climbing towards the whole budget.

No torch import: without a pool (`cache=None`) it does reservations only, which is all the scheduler's tests need.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.engine.request import Request

if TYPE_CHECKING:
    from server.engine.kv_cache import PagedKVCache

PREFIX_SHARE = 0.25  # default cap of prefix-only blocks, as a share of the pool


class KVBudgetError(ValueError):
    """The request needs more KV cache than the whole budget; the message names the limit and what would fit."""


@dataclass(frozen=True)
class Reused:
    """What a prompt took from the prefix cache: its KV up to `start` (computing resumes there) and, for a request
    that scores its prompt, the prompt logprobs, top alternatives and ranks of tokens 0 .. start (the first None)."""

    start: int
    logprobs: list[float | None] | None = None
    tops: list[dict[int, float] | None] | None = None
    ranks: list[int | None] | None = None


class KVManager:
    def __init__(self, *, num_blocks: int, block_size: int, cache: PagedKVCache | None = None,
                 prefix_caching: bool = False, prefix_blocks: int | None = None) -> None:
        """num_blocks: blocks that reservations may hand out (the budget); prefix_blocks: cap on prefix-only blocks
        (default PREFIX_SHARE of the budget)."""
        self.num_blocks, self.block_size, self.cache = num_blocks, block_size, cache
        self.prefix_caching = prefix_caching and cache is not None
        self.prefix_blocks = int(num_blocks * PREFIX_SHARE) if prefix_blocks is None else prefix_blocks
        self.reserved: dict[str, int] = {}  # request id -> blocks reserved
        self.reused_tokens = 0  # prompt tokens whose KV came from the prefix cache (not recomputed)

    # -- arithmetic (written once) --------------------------------------------------------------------------------

    def blocks_for(self, length: int) -> int:
        """Blocks that hold `length` tokens of one slot."""
        return -(-length // self.block_size)

    def reservation(self, request: Request) -> int:
        """Blocks a request's whole life needs: slots x blocks of its length (a probe: each prompt in its own)."""
        if request.probe_prompts is not None:
            per_slot = sum(self.blocks_for(len(p)) for p in request.probe_prompts)
        else:
            per_slot = self.blocks_for(request.kv_length())
        return request.schedule.num_slots * per_slot

    @property
    def reserved_blocks(self) -> int:
        return sum(self.reserved.values())

    @property
    def budget_slot_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def longest(self, slots: int) -> int:
        """The most tokens (prompt + max_tokens) a request whose policy runs `slots` attentions can ever hold."""
        return (self.num_blocks // slots) * self.block_size

    def check(self, request: Request) -> None:
        """Raise KVBudgetError when this request could never be admitted."""
        need = self.reservation(request)
        if need > self.num_blocks:
            slots = request.schedule.num_slots
            fits = self.longest(slots)
            if request.probe_prompts is not None:  # one forward pass of its prompts, each in blocks of its own
                raise KVBudgetError(
                    f"this request's {len(request.probe_prompts)} prompts need {slots} KV slots (its policy's "
                    f"attention runs) x {need // slots * self.block_size} tokens (each prompt in whole blocks of "
                    f"{self.block_size}) = {need * self.block_size} slot-tokens, but the server's KV budget is "
                    f"{self.budget_slot_tokens} slot-tokens (kv_budget_tokens); under this policy one request's "
                    f"prompts must hold at most {fits} tokens"
                )
            raise KVBudgetError(
                f"this request needs {slots} KV slots (its policy's attention runs) x {request.kv_length()} tokens "
                f"(prompt + max_tokens) = {need * self.block_size} slot-tokens, but the server's KV budget is "
                f"{self.budget_slot_tokens} slot-tokens (kv_budget_tokens); under this policy prompt + max_tokens "
                f"must be at most {fits}"
            )

    def can_reserve(self, request: Request) -> bool:
        return self.reserved_blocks + self.reservation(request) <= self.num_blocks

    def reserve(self, request: Request) -> None:
        assert request.id not in self.reserved, f"{request.id} already holds a reservation"
        self.reserved[request.id] = self.reservation(request)

    def free(self, request_id: str) -> None:
        """The request ended: its reservation ends, its blocks return to the pool, and prefix-only blocks beyond the
        cap are evicted."""
        self.reserved.pop(request_id, None)
        if self.cache is not None:
            self.cache.free(request_id)
            self.cache.trim(self.prefix_blocks)

    def rollback(self, request: Request, n: int) -> None:
        """Forget the last `n` tokens of a running request (a verifier rejected them): its outputs shrink and its
        cache keeps only the blocks the remaining tokens use (rewritten when decoding goes on). One token at least
        stays: the next step decodes from it (the first was sampled from the prefill's logits, not kept)."""
        assert 0 <= n < len(request.output_ids), f"rolling back {n} of {len(request.output_ids)} tokens: keep one"
        if n:
            del request.output_ids[-n:], request.logprobs[-n:]
            del request.top_logprobs[len(request.output_ids):]
        if self.cache is not None:
            self.cache.truncate(request.id, request.length - 1)  # the last token's KV is written by the next step

    # -- what the pool holds --------------------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        return 0 if self.cache is None else self.cache.used_blocks

    @property
    def prefix_only_blocks(self) -> int:
        """Blocks the prefix cache keeps that no request holds (bounded by `prefix_blocks`)."""
        return 0 if self.cache is None else self.cache.cached_blocks

    def usage(self) -> float:
        """Share of the pool's blocks held by requests."""
        return 0.0 if self.cache is None else self.cache.used_blocks / self.cache.num_blocks

    # -- prefix reuse -----------------------------------------------------------------------------------------------

    def reuse(self, s: Request) -> Reused:
        """Take what the prefix cache holds of `s`'s prompt: the cached full blocks it starts with (adopted), then a
        copy of the registered block that agrees longest with its next tokens. A prompt keeps at least its last
        token to compute. An echo request reuses only tokens whose prompt logprobs (with at least as many
        alternatives as it asks for) are cached, up to and including the first token it computes from."""
        if not self.prefix_caching:
            return Reused(0)
        cache, size, ids = self.cache, self.block_size, s.prompt_ids
        assert cache is not None
        key, n = s.prefix_key, s.params.prompt_alternatives
        entries = cache.lookup(key, ids, (len(ids) - 1) // size)
        if n is not None:
            entries = list(itertools.takewhile(lambda e: e.scores is not None and e.scores[0] >= n, entries))
        j = len(entries)
        partial = cache.lookup_partial(key, entries[-1].chain if entries else 0, ids[j * size : (j + 1) * size])
        # tokens of the partial block to take: echo needs the logprob of the token it starts at, which the cache
        # holds only where that token agrees too
        take = 0
        if partial is not None and (n is None or (partial[0].scores is not None and partial[0].scores[0] >= n)):
            take = min(partial[1] - (n is not None), len(ids) - 1 - j * size)
        start = 0
        if take >= 1:
            cache.adopt(s.id, s.schedule.slots, entries)
            if cache.copy(s.id, s.schedule.slots, partial[0]):
                start = j * size + take
            else:  # the pool is too tight to copy: reuse whole blocks only
                cache.free(s.id)
                take = 0
        boundary = None
        if not take:
            while n is not None and entries:  # the first token after the blocks: its logprob is cached with them
                boundary = entries[-1].next.get(ids[len(entries) * size])
                if boundary is not None and boundary[0] >= n:
                    break
                entries, boundary = entries[:-1], None
            cache.adopt(s.id, s.schedule.slots, entries)
            start = len(entries) * size
        self.reused_tokens += start
        s.cached_tokens = start
        if n is None:
            return Reused(start)
        logprobs, tops, ranks = [], [], []
        for e in entries:  # payloads: (alternatives kept, logprobs, top dicts, ranks)
            logprobs += e.scores[1]
            tops += e.scores[2]
            ranks += e.scores[3]
        if take:  # tokens j*size .. start, all agreeing with the copied block's
            logprobs += partial[0].scores[1][: take + 1]
            tops += partial[0].scores[2][: take + 1]
            ranks += partial[0].scores[3][: take + 1]
        elif entries:
            logprobs.append(boundary[1])
            tops.append(boundary[2])
            ranks.append(boundary[3])
        else:
            logprobs.append(None)
            tops.append(None)
            ranks.append(None)
        return Reused(start, logprobs, [None if t is None else dict(list(t.items())[:n]) for t in tops], ranks)

    def register(self, s: Request, start: int) -> None:
        """Make `s`'s prompt blocks findable (the last one even if partly filled), with their prompt logprobs when
        it has them."""
        if not self.prefix_caching:
            return
        cache, size = self.cache, self.block_size
        assert cache is not None
        L = len(s.prompt_ids)
        entries = cache.register(s.id, s.prefix_key, s.schedule.slots, s.prompt_ids, start // size, self.blocks_for(L))
        n = s.params.prompt_alternatives
        if n is None or s.prompt_logprobs is None or s.prompt_ranks is None:
            return
        tops = s.prompt_top_logprobs or [None] * L
        for j, e in enumerate(entries):
            if e.scores is None or e.scores[0] < n:
                part = slice(j * size, (j + 1) * size)
                e.scores = (n, s.prompt_logprobs[part], tops[part], s.prompt_ranks[part])
            after = (j + 1) * size
            known = e.next.get(s.prompt_ids[after]) if after < L else None
            if after < L and (known is None or known[0] < n):
                e.next[s.prompt_ids[after]] = (n, s.prompt_logprobs[after], tops[after], s.prompt_ranks[after])

