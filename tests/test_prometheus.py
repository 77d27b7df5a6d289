"""A real Prometheus scrapes a real Painters server under mixed-policy traffic; PromQL latency quantiles come back
per canonical policy (the metric names contain ':', which PromQL accepts)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving import Process, painters_server, prometheus_binary, prometheus_server, wait_until

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
POLICIES = {"full": "full", "skip:10": "skip:10-19", "pairs": "pairs:4-25"}
QUANTILES = {
    name: f"histogram_quantile(0.5, sum by (le, policy) (rate(painters:{name}_bucket[30s])))"
    for name in ("time_per_output_token_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds")
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    if prometheus_binary() is None:
        pytest.skip("the 'prometheus' binary is not on PATH (Debian: apt-get install prometheus)")
    tmp = Path(tmp_path_factory.mktemp("prometheus"))
    with painters_server(tmp) as server:
        target = server.url.removeprefix("http://")
        with prometheus_server(tmp, targets=[target], interval="1s") as prom:
            yield server, prom


def query(prom: Process, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom.url}/api/v1/query", params={"query": promql}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", body
    return body["data"]["result"]


def by_policy(result: list[dict[str, Any]]) -> dict[str, float]:
    return {s["metric"].get("policy", ""): float(s["value"][1]) for s in result}


def _traffic(url: str, policy: str, stop: threading.Event, errors: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        while not stop.is_set():
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6,
                                                "temperature": 0, "ignore_eos": True, "policy": policy})
            if r.status_code != 200:
                errors.append(f"{policy}: {r.status_code} {r.text}")
                return


def test_prometheus_quantiles_per_policy(stack):
    server, prom = stack
    wait_until(lambda: [s["value"][1] for s in query(prom, 'up{job="painters"}')] == ["1"], timeout=60,
               what="prometheus scrapes the painters server", interval=0.5)

    stop, errors = threading.Event(), []
    threads = [threading.Thread(target=_traffic, args=(server.url, p, stop, errors), daemon=True) for p in POLICIES]
    for t in threads:
        t.start()
    latest: dict[str, dict[str, float]] = {}

    def every_policy_has_every_quantile() -> bool:
        assert not errors, errors
        for name, promql in QUANTILES.items():
            latest[name] = by_policy(query(prom, promql))
        return all(math.isfinite(latest[name].get(p, math.nan)) for name in QUANTILES for p in POLICIES.values())

    try:
        wait_until(every_policy_has_every_quantile, timeout=120, what=f"quantiles for {list(POLICIES.values())}",
                   interval=1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors

    for name, values in latest.items():
        for policy in POLICIES.values():
            assert 0 < values[policy] < 60, (name, policy, values)
    # Every request's end-to-end latency exceeds its time to first token, and both use the same buckets.
    for policy in POLICIES.values():
        assert latest["e2e_request_latency_seconds"][policy] >= latest["time_to_first_token_seconds"][policy]

    counts = by_policy(query(prom, f'sum by (policy) (painters:request_success_total{{model="{MODEL}"}})'))
    assert all(counts.get(p, 0) >= 1 for p in POLICIES.values()), counts
    tokens = by_policy(query(prom, "sum by (policy) (painters:generation_tokens_total)"))
    assert all(tokens[p] >= 6 for p in POLICIES.values()), tokens
    assert query(prom, f'painters:num_requests_running{{model="{MODEL}"}}'), "the running gauge is not scraped"
