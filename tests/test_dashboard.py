"""Every query of the Grafana dashboard, evaluated by a real Prometheus scraping a real server under mixed-policy
traffic (streaming and not, client aborts, rejected requests): each returns data, and each per-policy query a series
for every policy sent."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.engine.generate import Engine
from server.settings import Settings
from tests.conftest import CharTokenizer, tiny_llama
from tests.serving import HOST, free_port, prometheus_binary, prometheus_server, wait_until

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/painters.json"
SENT = {"full": "full", "skip:2": "skip:2-3", "pairs": "pairs:1-4"}  # policy sent -> canonical label (6 layers)
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval becomes for a 5 s scrape interval and a short range
QUERY_DEADLINE_S = 60


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, with the dashboard variables as Grafana fills them for 'All'."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$policy", ".*").replace("$replica", ".*")
            expr = expr.replace("$__rate_interval", RATE_INTERVAL)
            assert "$" not in expr, f"unsubstituted variable in {expr}"
            out.append((panel["title"], expr))
    return out


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """The real app (tiny random Llama, char tokenizer) under uvicorn on a loopback port, in a thread; it drafts
    tokens by prompt lookup, so that the speculative-decoding panels have data (the char tokenizer's repeated
    letters always find a match)."""
    app = create_app(Settings(model="tiny", max_model_len=128,
                              speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                  "prompt_lookup_min": 1}),
                     engine_factory=lambda s: Engine.from_hf(tiny_llama(), CharTokenizer()))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-dashboard-test", daemon=True)
    thread.start()
    url = f"http://{HOST}:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200, timeout=60,
                   what="painters server /ready", interval=0.1,
                   alive=lambda: None if thread.is_alive() else "uvicorn thread exited")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _traffic(url: str, stop: threading.Event, *, deadline_s: float = 90, max_rounds: int = 300) -> None:
    """Rounds of: per policy a plain, a streamed and an aborted completion; then a 400 and a 404. Bounded."""
    end = time.monotonic() + deadline_s
    body = {"prompt": "the quick brown fox", "max_tokens": 6, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(max_rounds):
            if stop.is_set() or time.monotonic() > end:
                return
            for policy in SENT:
                r = client.post("/v1/completions", json={**body, "policy": policy})
                assert r.status_code == 200, r.text
                with client.stream("POST", "/v1/completions", json={**body, "policy": policy, "stream": True}) as r:
                    assert r.status_code == 200
                    for _ in r.iter_lines():
                        pass
                # A long stream the client leaves after its first event: the server records an abort.
                long = {**body, "policy": policy, "stream": True, "max_tokens": 100}
                with client.stream("POST", "/v1/completions", json=long) as r:
                    next(line for line in r.iter_lines() if line.startswith("data:"))
            assert client.post("/v1/completions", json={**body, "policy": "skip:99"}).status_code == 400
            assert client.post("/v1/completions", json={**body, "model": "no-such-model"}).status_code == 404


@dataclass
class Scraping:
    url: str  # the Prometheus
    traffic_errors: list[BaseException]

    def check_traffic(self) -> None:
        if self.traffic_errors:
            raise AssertionError("the traffic generator failed") from self.traffic_errors[0]


@pytest.fixture(scope="module")
def scraping(server_url: str, tmp_path_factory) -> Iterator[Scraping]:
    if prometheus_binary() is None:
        pytest.skip("the prometheus binary is missing: apt-get install prometheus (.ci/run installs it)")
    target = server_url.removeprefix("http://")
    with prometheus_server(tmp_path_factory.mktemp("prometheus"), targets=[target], interval="1s") as prom:
        stop = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                _traffic(server_url, stop)
            except BaseException as e:  # surfaced by the test, not lost in the thread
                errors.append(e)

        thread = threading.Thread(target=run, name="dashboard-traffic", daemon=True)
        thread.start()
        try:
            yield Scraping(prom.url, errors)
        finally:
            stop.set()
            thread.join(timeout=60)


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"Prometheus rejected {expr}: {body}"
    return body["data"]["result"]


def _missing(expr: str, result: list[dict[str, Any]]) -> str | None:
    """What the result still lacks: any finite value; for a per-policy query, a finite value for each policy."""
    finite = [s for s in result if math.isfinite(float(s["value"][1]))]
    if not finite:
        return "no finite value"
    if "policy=~" in expr:
        have = {s["metric"].get("policy") for s in finite}
        lacking = set(SENT.values()) - have
        if lacking:
            return f"no series for {sorted(lacking)} (has {sorted(have, key=str)})"
    return None


def test_every_dashboard_query_returns_data_per_policy(scraping: Scraping):
    prometheus_url = scraping.url
    queries = dashboard_queries()
    assert len(queries) >= 15
    pending = dict.fromkeys(queries, "not evaluated")
    deadline = time.monotonic() + QUERY_DEADLINE_S
    while pending and time.monotonic() < deadline:
        scraping.check_traffic()
        for title, expr in list(pending):
            why = _missing(expr, _query(prometheus_url, expr))
            if why is None:
                del pending[(title, expr)]
            else:
                pending[(title, expr)] = why
        if pending:
            time.sleep(0.5)
    if pending:
        targets = httpx.get(f"{prometheus_url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
        report = "\n".join(f"  [{title}] {expr}\n    -> {why}" for (title, expr), why in pending.items())
        pytest.fail(f"{len(pending)} dashboard queries without data after {QUERY_DEADLINE_S} s "
                    f"(targets: {health}):\n{report}")


def test_policy_variable_lists_every_policy(scraping: Scraping):
    """The variable's label_values(painters:e2e_request_latency_seconds_count, policy), through Prometheus' API."""
    def listed() -> bool:
        scraping.check_traffic()
        r = httpx.get(f"{scraping.url}/api/v1/label/policy/values",
                      params={"match[]": "painters:e2e_request_latency_seconds_count"}, timeout=10)
        return set(SENT.values()) <= set(r.json()["data"])

    wait_until(listed, timeout=QUERY_DEADLINE_S, what="policy label values in Prometheus", interval=0.5)
