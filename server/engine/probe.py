"""Layer probes: how alike are the hidden states a schedule's steps see. Reduced where the states live (the engine
thread); only these statistics leave it.

For the states x_0 .. x_S entering each of a schedule's S steps and its final output (before the final norm):
- similarity[i][j]: cosine between x_i and x_j, each sequence's states flattened over its positions, averaged over
  sequences (the paper's notebook);
- block_influence[i] = 1 - mean over tokens of cos(x_i, x_{i+1}) (ShortGPT's BI);
- angular_distance[n - 1][i] = arccos(cos(x_i, x_{i+n})) / pi on each sequence's last token, averaged over sequences,
  for n = 1 .. S // 2 (Gromov et al.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

from server.policy.compiler import Schedule

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class ProbeStats:
    policy: str
    schedule: str
    steps: list[str]  # one label per step: "7", or "4+5/pairs" for a group
    num_sequences: int
    num_tokens: int
    similarity: list[list[float]]  # [S + 1][S + 1]
    block_influence: list[float]  # [S]
    angular_distance: list[list[float]]  # [S // 2][S + 1 - n]


def step_labels(schedule: Schedule) -> list[str]:
    return [str(s.layers[0]) if len(s.layers) == 1 else "+".join(map(str, s.layers)) + f"/{s.combine}"
            for s in schedule.steps]


class Reducer:
    """A probe's statistics summed chunk by chunk: each chunk of sequences is right-padded to its own longest, so a
    probe's memory is bounded by a chunk's padded size, not by every row times the longest (see `chunks`)."""

    def __init__(self) -> None:
        self.similarity: Tensor | None = None  # [K, K] summed over sequences
        self.token_cos: Tensor | None = None  # [K - 1] summed over tokens
        self.angle: Tensor | None = None  # [K, K] summed over sequences
        self.num_sequences = 0
        self.num_tokens = 0

    def add(self, states: list[Tensor], lengths: list[int]) -> None:
        """states: S + 1 tensors [n, T, d] (right-padded rows); lengths: real tokens per row."""
        import torch  # here, not at the top: the HTTP layer imports ProbeStats and never touches tensors

        n, T = states[0].shape[:2]
        dev = states[0].device
        valid = torch.arange(T, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]  # [n, T]
        x = torch.stack(states).float() * valid[None, :, :, None]  # [K, n, T, d]; padding zeroed
        K = x.shape[0]
        flat = x.reshape(K, n, -1)
        gram = torch.einsum("inf,jnf->nij", flat, flat)  # [n, K, K]
        norm = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-30).sqrt()  # [n, K]
        # sums in float64: many cosines near 1 summed in float32 would lose the 1e-6 that tell an identity layer
        similarity = (gram / (norm[:, :, None] * norm[:, None, :])).double().sum(0)
        token_cos = (torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1) * valid).double().sum((1, 2))
        last = x[:, torch.arange(n, device=dev), torch.tensor(lengths, device=dev) - 1]  # [K, n, d]
        unit = (last / last.norm(dim=-1, keepdim=True).clamp_min(1e-30)).transpose(0, 1).double()  # [n, K, d]
        # the angle from the chord, 2 asin(|u - v| / 2): arccos of a cosine near 1 turns its rounding into ~1e-4 of
        # angle in float32, the size of what tells a layer that changes nothing (the ones this statistic looks for)
        chord = torch.cdist(unit, unit, compute_mode="donot_use_mm_for_euclid_dist")  # [n, K, K]
        angle = (2 * torch.asin((chord / 2).clamp(0, 1))).sum(0)  # [K, K]
        if self.similarity is None:
            self.similarity, self.token_cos, self.angle = similarity, token_cos, angle
        else:
            self.similarity, self.token_cos, self.angle = (self.similarity + similarity, self.token_cos + token_cos,
                                                           self.angle + angle)  # type: ignore[operator]
        self.num_sequences += n
        self.num_tokens += sum(lengths)

    def result(self, schedule: Schedule) -> ProbeStats:
        assert self.similarity is not None and self.token_cos is not None and self.angle is not None, "no sequence"
        angle = self.angle / self.num_sequences / math.pi
        S = angle.shape[0] - 1
        return ProbeStats(
            policy=schedule.policy, schedule=schedule.key, steps=step_labels(schedule),
            num_sequences=self.num_sequences, num_tokens=self.num_tokens,
            similarity=(self.similarity / self.num_sequences).tolist(),
            block_influence=(1 - self.token_cos / self.num_tokens).tolist(),
            angular_distance=[angle.diagonal(offset=k).tolist() for k in range(1, S // 2 + 1)],
        )


def chunks(lengths: list[int]) -> list[list[int]]:
    """The rows of a probe in chunks, longest first, each as many rows as fit in padded tokens (rows x its longest)
    no more than the probe's own tokens: what the HTTP layer bounds (probe_max_tokens) bounds memory too. One long
    prompt beside many short ones was padded to rows x longest: 64 x 4,000 positions for 4,063 tokens."""
    budget = sum(lengths)
    out: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget:
            out[-1].append(row)
        else:
            out.append([row])
    return out


def reduce(schedule: Schedule, states: list[Tensor], lengths: list[int]) -> ProbeStats:
    """states: S + 1 tensors [n, T, d] (right-padded rows); lengths: real tokens per row."""
    r = Reducer()
    r.add(states, lengths)
    return r.result(schedule)
