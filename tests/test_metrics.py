"""Metrics on their own (no model): policy labels stay short and few whatever policies clients send."""

from __future__ import annotations

import random

from server.metrics import LABEL_CHARS, Metrics, RequestStats, StepStats


def observe(m: Metrics, policy: str) -> None:
    m.observe_request(RequestStats(policy, "length", 1, 2, 0.1, 0.1, 0.1, 0.1, 0.3, (0.1,)))
    m.observe_step(StepStats(policy, 1, 0.1))


def long_policy(rnd: random.Random) -> str:
    return "schedule:" + ",".join(str(rnd.randrange(30)) for _ in range(1000))[:2600]


def labels(m: Metrics) -> set[str]:
    return {s.labels["policy"] for f in m.registry.collect() for s in f.samples if "policy" in s.labels}


def test_a_long_policy_is_labelled_by_its_head_and_a_digest():
    """Each series repeated a client's whole canonical policy (up to max_policy_chars): 32 labels of 2.6 KB
    policies made a 19 MB scrape."""
    m = Metrics(model="m", max_policies=32)
    long = [long_policy(random.Random(k)) for k in range(40)]
    for policy in [*long, "skip:2-3"]:
        observe(m, policy)
    got = labels(m)
    assert max(len(label) for label in got) <= LABEL_CHARS
    assert len(got - {"other"}) == 32 and "other" in got  # distinct long policies stayed distinct up to the cap
    assert all(label.startswith("schedule:") for label in got - {"other"})
    assert len(m.render()[0]) < 1_500_000


def test_a_short_policy_and_a_reserved_long_one_keep_their_label():
    m = Metrics(model="m", max_policies=1)
    preset = "schedule:" + ",".join(["0"] * 100)  # the server's own, however long
    m.reserve([preset])
    for policy in ("skip:2-3", preset):
        observe(m, policy)
    assert labels(m) == {"skip:2-3", preset}


def test_prefix_cache_counters_count_only_requests_that_looked_up():
    """vLLM's pair: queries count a looked-up request's prompt tokens, hits those the cache held; a request that never
    looked up (prefix caching off) counts in neither, so hits / queries stays the share of the cache's work."""
    from tests.serving import metric_value

    m = Metrics(model="m")
    m.observe_request(RequestStats("full", "stop", 40, 2, 0.1, 0.1, 0.1, 0.1, 0.3, (), cached_tokens=32))
    m.observe_request(RequestStats("full", "stop", 10, 2, 0.1, 0.1, 0.1, 0.1, 0.3, (), cached_tokens=0))
    m.observe_request(RequestStats("full", "stop", 99, 2, 0.1, 0.1, 0.1, 0.1, 0.3, ()))  # not looked up
    text = m.render()[0].decode()
    assert metric_value(text, "painters:prefix_cache_queries_total", policy="full") == 50
    assert metric_value(text, "painters:prefix_cache_hits_total", policy="full") == 32
