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


def reduce(schedule: Schedule, states: list[Tensor], lengths: list[int]) -> ProbeStats:
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
    similarity = (gram / (norm[:, :, None] * norm[:, None, :])).mean(0)
    token_cos = torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1)  # [K - 1, n, T]
    block_influence = 1 - (token_cos * valid).sum((1, 2)) / valid.sum()
    last = x[:, torch.arange(n, device=dev), torch.tensor(lengths, device=dev) - 1]  # [K, n, d]
    unit = last / last.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    angle = torch.einsum("ind,jnd->nij", unit, unit).clamp(-1, 1).arccos().mean(0) / math.pi  # [K, K]
    S = K - 1
    distances = [angle.diagonal(offset=k).tolist() for k in range(1, S // 2 + 1)]
    return ProbeStats(
        policy=schedule.policy, schedule=schedule.key, steps=step_labels(schedule), num_sequences=n,
        num_tokens=sum(lengths), similarity=similarity.tolist(), block_influence=block_influence.tolist(),
        angular_distance=distances,
    )
