"""Next-token choice: each row's own parameters and generator."""

from __future__ import annotations

import torch

from server.sampling import SamplingParams, make_generator, sample


def draws(logits, params, seed, n=300):
    g = make_generator(seed, torch.device("cpu"))
    return {int(sample(logits[None].clone(), [params], [g])[0]) for _ in range(n)}


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    gens = [make_generator(0, torch.device("cpu"))] * 2
    assert sample(logits, [SamplingParams()] * 2, gens).tolist() == [1, 0]


def test_top_k_limits_support():
    logits = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert draws(logits, SamplingParams(temperature=1.0, top_k=2), 0) == {0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.7), 1) == {0, 1}
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.4), 1) == {0}


def test_temperature_sampling_covers_the_distribution_and_seeds_repeat():
    logits = torch.zeros(5)
    assert draws(logits, SamplingParams(temperature=1.0), 2) == set(range(5))
    p = SamplingParams(temperature=1.0, seed=5)
    a = [int(sample(logits[None].clone(), [p], [g])[0]) for g in [make_generator(5, torch.device("cpu"))] for _ in range(20)]
    g = make_generator(5, torch.device("cpu"))
    b = [int(sample(logits[None].clone(), [p], [g])[0]) for _ in range(20)]
    assert a == b
