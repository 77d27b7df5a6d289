"""Speculative decoding: what a row's drafts are and which of them its own schedule keeps.

A proposer drafts a row's next few tokens cheaply; the row's schedule then computes every drafted position in one
forward (`Batch.decode`), and the row's sampler chooses a token at each of them as it would have decoding one at a
time (the same processors, the same draws from its generator). The row keeps the drafts up to the first one its
sampler did not choose, and the token it chose there: one to k + 1 tokens per forward, the same tokens as without
speculation (vLLM's speculative decoding, with exact-match verification, which keeps a sampled row's distribution
and a seeded row's draws). Up to rounding: a forward over k + 1 positions computes each position's logits with other
kernels' sums than a one-position step does. In float32 they differ by ~1e-5 and the tokens were the same in every
test; in bfloat16 (CUDA's default) two tokens that nearly tie can swap.

Two proposers:
- `ngram` (vLLM's prompt lookup): the tokens that followed the latest earlier occurrence of the row's last n tokens
  (n from prompt_lookup_max down to prompt_lookup_min) in its prompt and output. Free: no forward. It pays where the
  answer copies its context (extraction, editing, code, summaries).
- `layer_skip` (self-speculation, Painters' own): the row's own layers under a cheaper policy (`draft_policy`, say a
  skip of the middle layers: the paper's observation that they can be left out, used without changing a token).
  The draft runs a subset of the row's slots and reads the KV its schedule wrote; the verifying forward rewrites
  every slot of every drafted position, so the cache stays exact. A row whose schedule lacks one of the draft's
  slots decodes without drafts.

Pure but for `propose_ngram`'s numpy: no torch here; the forwards and the draws are `Batch`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from server.policy.compiler import Schedule

Method = Literal["ngram", "layer_skip"]
METHODS: tuple[Method, ...] = ("ngram", "layer_skip")
MAX_SPECULATIVE_TOKENS = 16  # drafted per row and step at most: a verifying forward computes k + 1 positions
# ngram's shortest suffix by default: matching a single token drafted after nearly every token of GSM8K answers and
# kept a quarter of the drafts, 0.83 of the speed without drafts on SmolLM2 at batch 1; from two tokens on, 0.99-1.02
# (and 1.67 against 1.32 on a copying task at k = 4: docs/results/speculative.md)
PROMPT_LOOKUP_MIN = 2


@dataclass(frozen=True)
class Speculation:
    """How a batch drafts: `num_tokens` at most per row and step, by `method` (see the module's docstring)."""

    method: Method
    num_tokens: int
    lookup_max: int = 4  # ngram: the longest suffix looked up
    lookup_min: int = PROMPT_LOOKUP_MIN  # ngram: the shortest
    draft: str | None = None  # layer_skip: the draft's policy, canonical (compiled per model by the batch)
    # no row drafts while more than this many decode (vLLM's disable_by_batch_size): a verifying forward computes
    # k + 1 positions of every drafting row, which costs more as the batch fills; None: at any batch size
    up_to_rows: int | None = None

    def __post_init__(self) -> None:
        assert self.method in METHODS, self.method
        assert 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS, self.num_tokens
        assert 1 <= self.lookup_min <= self.lookup_max, (self.lookup_min, self.lookup_max)
        assert (self.draft is not None) == (self.method == "layer_skip"), (self.method, self.draft)
        assert self.up_to_rows is None or self.up_to_rows >= 1, self.up_to_rows


@dataclass
class SpeculationStats:
    """What speculation did for one request (vLLM's spec-decode counters): forwards that verified drafts, the
    tokens drafted in them, and how many of those the request kept."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


def runs_within(draft: Schedule, target: Schedule) -> bool:
    """Whether a draft can run on a row of `target`: every slot it writes and reads is one of the target's, whose
    KV it reads (a one-layer step of the draft in a parallel group of the target is fine: the slot is the same)."""
    return set(draft.slots) <= set(target.slots) and draft.key != target.key


def room(*, num_tokens: int, made: int, max_tokens: int, length: int, max_len: int) -> int:
    """Drafts a row may verify now: at most `num_tokens`, and few enough that the tokens it may keep (the drafts
    and one more) end it no later than max_tokens and max_len would (made: its output tokens; length: its prompt
    and output)."""
    return max(0, min(num_tokens, max_tokens - made - 1, max_len - length - 1))


def propose_ngram(tokens: Sequence[int], *, k: int, lookup_min: int, lookup_max: int) -> list[int]:
    """The at most k tokens that followed the latest earlier occurrence of `tokens`' last n tokens, for the largest
    n in [lookup_min, lookup_max] that occurs earlier (vLLM's prompt lookup); [] when none does.

    One pass over the history finds the earlier occurrences of the last token; each longer suffix only narrows
    those. A row's whole history is searched every step: 2,000 tokens of no match take 0.06 ms so (0.22 ms
    comparing every window), 8,000 take 0.14 ms (0.73), most of it the list's conversion."""
    if k < 1 or len(tokens) < lookup_min + 1:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    L = len(seq)
    ends = np.flatnonzero(seq[:-1] == seq[-1])  # where an earlier occurrence of the last n tokens ends, n = 1
    best = None
    for n in range(1, min(lookup_max, L - 1) + 1):
        if n > 1:
            ends = ends[ends >= n - 1]
            ends = ends[seq[ends - (n - 1)] == seq[L - n]]
        if not ends.size:
            break
        if n >= lookup_min:
            best = int(ends[-1])  # the latest occurrence of the longest suffix so far
    return [] if best is None else seq[best + 1 : best + 1 + k].tolist()


def accepted(drafts: Sequence[int], chosen: Sequence[int]) -> int:
    """How many leading drafts the sampler chose: chosen[j] is its token where drafts[j] was proposed."""
    assert len(chosen) == len(drafts) + 1, (len(drafts), len(chosen))
    n = 0
    while n < len(drafts) and drafts[n] == chosen[n]:
        n += 1
    return n
