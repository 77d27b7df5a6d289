"""Prometheus metrics, in the style of vLLM. The only module that imports prometheus_client.

The engine loop hands plain stats dataclasses (`RequestStats`, `StepStats`, `QueueStats`) to `Metrics`; latency
histograms and token counters are labelled by `policy` (canonical string) and `model`. The server's own policies
(its default and its presets) are reserved labels; beyond them at most `max_policies` distinct policy labels exist,
and later ones are folded into `other`, so label cardinality stays bounded and no client can take the server's own
policies' series away by sending many others first. A client's policy longer than `LABEL_CHARS` is labelled by its
head and a digest: its canonical string may run to max_policy_chars, and every series repeated it. A Ray Serve
replica adds a constant `replica` label to every series and serves them on a port of its own (`serve_http`).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

# From ~1 ms (GPU decode) to minutes (long CPU generations).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06,
                         0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)  # (a 7B on a CPU: ~1 s)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OTHER = "other"
# A client's policy label at most: 32 labels of 2.6 KB policies made each scrape 19 MB, rendered in 0.4 s on the
# event loop (~230 series per label, each repeating it).
LABEL_CHARS = 64

disable_created_metrics()  # no *_created series: they double /metrics and nothing reads them


@dataclass(frozen=True)
class RequestStats:
    policy: str
    finished_reason: str  # stop | length | abort | error
    prompt_tokens: int
    generation_tokens: int
    queue_s: float
    prefill_s: float
    decode_s: float
    ttft_s: float
    e2e_s: float
    per_token_s: tuple[float, ...]  # inter-token latencies after the first token
    cached_tokens: int | None = None  # prompt tokens the prefix cache held; None: not looked up


@dataclass(frozen=True)
class SpeculationStats:
    """One verifying step's drafts of one policy's rows (vLLM's spec-decode counters, counted per step): rows that
    had drafts, tokens drafted, drafts kept."""

    policy: str
    drafts: int
    draft_tokens: int
    accepted_tokens: int


@dataclass(frozen=True)
class StepStats:
    policy: str  # canonical policy of the group that ran
    batch_size: int
    duration_s: float


@dataclass(frozen=True)
class QueueStats:
    running: int
    waiting: int
    kv_usage: float  # 0..1
    prefix_cache_blocks: int = 0  # KV blocks kept only for prefix reuse
    prefix_cache_limit: int = 0  # their cap
    decode_graphs: dict[str, float] | None = None  # server.engine.graphs' stats(); None without captured steps


def _short(policy: str) -> str:
    """`policy`, or if longer than LABEL_CHARS its head and a digest of the whole (distinct policies stay distinct)."""
    if len(policy) <= LABEL_CHARS:
        return policy
    digest = hashlib.sha256(policy.encode()).hexdigest()[:8]
    return f"{policy[:LABEL_CHARS - len(digest) - 3]}...{digest}"


class _ConstantLabel:
    """A collector that re-exposes `registry` with one more label on every sample (prometheus_client has no
    constant labels)."""

    def __init__(self, registry: CollectorRegistry, name: str, value: str) -> None:
        self.registry, self.name, self.value = registry, name, value

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, self.name: self.value}, s.value, s.timestamp, s.exemplar)
            yield out


class Metrics:
    def __init__(self, *, model: str, max_policies: int = 32, registry: CollectorRegistry | None = None,
                 replica: str | None = None) -> None:
        self.model, self.max_policies, self.replica = model, max_policies, replica
        self.registry = registry or CollectorRegistry()
        self._exposed = self.registry if replica is None else _ConstantLabel(self.registry, "replica", replica)
        self._policies: set[str] = set()
        self._reserved: set[str] = set()
        self._lock = threading.Lock()
        labels = ["model", "policy"]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"painters:{name}", doc, labels, buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Time from arrival to first token", LATENCY_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds", "Time between output tokens", TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency", LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Time waiting before the first step", LATENCY_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds", "Prefill time", LATENCY_BUCKETS)
        self.decode = hist("request_decode_time_seconds", "Decode time", LATENCY_BUCKETS)
        self.prompt_tokens = Counter("painters:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("painters:generation_tokens", "Tokens generated", labels, registry=r)
        # vLLM's pair: hits / queries is the share of prompt tokens the prefix cache spared computing
        self.prefix_queries = Counter("painters:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels, registry=r)
        self.prefix_hits = Counter("painters:prefix_cache_hits", "Prompt tokens found in the prefix cache (their KV "
                                   "was not computed again)", labels, registry=r)
        # vLLM's spec-decode counters: accepted / draft tokens is the share of drafts kept, and
        # (accepted + drafts) / drafts the tokens a verifying forward gives a row
        self.spec_drafts = Counter("painters:spec_decode_num_drafts", "Forwards that verified a request's drafted "
                                   "tokens (speculative decoding)", labels, registry=r)
        self.spec_draft_tokens = Counter("painters:spec_decode_num_draft_tokens", "Tokens drafted for verification",
                                         labels, registry=r)
        self.spec_accepted_tokens = Counter("painters:spec_decode_num_accepted_tokens", "Drafted tokens kept (the "
                                            "request's sampler chose them)", labels, registry=r)
        self.success = Counter("painters:request_success", "Finished requests", [*labels, "finished_reason"],
                               registry=r)
        self.running = Gauge("painters:num_requests_running", "Sequences being decoded", ["model"], registry=r)
        self.waiting = Gauge("painters:num_requests_waiting", "Requests waiting", ["model"], registry=r)
        self.kv_usage = Gauge("painters:kv_slots_usage_perc", "KV-cache slot usage (0-1)", ["model"], registry=r)
        self.prefix_blocks = Gauge("painters:prefix_cache_blocks", "KV blocks kept only for prefix reuse", ["model"],
                                   registry=r)
        self.prefix_limit = Gauge("painters:prefix_cache_blocks_limit", "Cap on painters:prefix_cache_blocks",
                                  ["model"], registry=r)
        self.graphs = Gauge("painters:decode_graphs", "Captured decode steps (CUDA graphs): kept, captured, replayed, "
                            "failed, evicted, hit rate, device bytes pinned, seconds capturing, bytes the kept graphs own, "
                            "layout hit rate", ["model", "stat"], registry=r)
        self.batch_size = Histogram("painters:batch_size", "Sequences per engine step", labels, buckets=BATCH_BUCKETS,
                                    registry=r)
        self.step_duration = hist("step_duration_seconds", "Engine step duration", TOKEN_LATENCY_BUCKETS)
        self.errors = Counter("painters:request_errors", "Requests rejected with an error status",
                              ["model", "status"], registry=r)

    def reserve(self, policies: Iterable[str]) -> None:
        """Labels that are always kept, outside the `max_policies` first come: the server's default and presets."""
        with self._lock:
            self._reserved.update(policies)

    def policy_label(self, policy: str) -> str:
        with self._lock:
            if policy in self._reserved:
                return policy
            label = _short(policy)
            if label in self._policies:
                return label
            if len(self._policies) < self.max_policies:
                self._policies.add(label)
                return label
            return OTHER

    def observe_request(self, s: RequestStats) -> None:
        labels = dict(model=self.model, policy=self.policy_label(s.policy))
        self.queue.labels(**labels).observe(s.queue_s)
        self.prompt_tokens.labels(**labels).inc(s.prompt_tokens)
        self.success.labels(**labels, finished_reason=s.finished_reason).inc()
        self.generation_tokens.labels(**labels).inc(s.generation_tokens)  # aborted ones were generated too
        if s.cached_tokens is not None:
            self.prefix_queries.labels(**labels).inc(s.prompt_tokens)
            self.prefix_hits.labels(**labels).inc(s.cached_tokens)
        if s.finished_reason in ("abort", "error"):
            return
        self.e2e.labels(**labels).observe(s.e2e_s)
        self.prefill.labels(**labels).observe(s.prefill_s)
        self.decode.labels(**labels).observe(s.decode_s)
        if s.generation_tokens:
            self.ttft.labels(**labels).observe(s.ttft_s)
        tpot = self.tpot.labels(**labels)
        for dt in s.per_token_s:
            tpot.observe(dt)

    def observe_step(self, s: StepStats) -> None:
        labels = dict(model=self.model, policy=self.policy_label(s.policy))
        self.batch_size.labels(**labels).observe(s.batch_size)
        self.step_duration.labels(**labels).observe(s.duration_s)

    def observe_speculation(self, s: SpeculationStats) -> None:
        labels = dict(model=self.model, policy=self.policy_label(s.policy))
        self.spec_drafts.labels(**labels).inc(s.drafts)
        self.spec_draft_tokens.labels(**labels).inc(s.draft_tokens)
        self.spec_accepted_tokens.labels(**labels).inc(s.accepted_tokens)

    def observe_queue(self, s: QueueStats) -> None:
        self.observe_counts(s.running, s.waiting)
        self.kv_usage.labels(model=self.model).set(s.kv_usage)
        self.prefix_blocks.labels(model=self.model).set(s.prefix_cache_blocks)
        self.prefix_limit.labels(model=self.model).set(s.prefix_cache_limit)
        for stat, value in (s.decode_graphs or {}).items():
            self.graphs.labels(model=self.model, stat=stat).set(value)

    def observe_counts(self, running: int, waiting: int) -> None:
        """The running and waiting gauges alone: what a submit or a waiting request's end changes."""
        self.running.labels(model=self.model).set(running)
        self.waiting.labels(model=self.model).set(waiting)

    def observe_error(self, status: int) -> None:
        self.errors.labels(model=self.model, status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for GET /metrics."""
        return generate_latest(self._exposed), CONTENT_TYPE_LATEST  # type: ignore[arg-type]

    def serve_http(self, *, host: str) -> int:
        """Serve `render()` on `host` at a free port of its own (a daemon thread); returns the port. A Ray Serve
        replica does this so Prometheus scrapes each replica, not whichever one the proxy picks. Always the text
        format GET /metrics answers: prometheus_client's own server would offer Prometheus OpenMetrics, whose
        negotiated escaping renames `painters:x` to `painters_x` and breaks the dashboard's queries."""
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client.exposition import ThreadingWSGIServer

        def app(environ: dict, start_response: Callable) -> list[bytes]:
            body, content_type = self.render()
            start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return [body]

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # one line per scrape is noise
                pass

        server = make_server(host, 0, app, server_class=ThreadingWSGIServer, handler_class=Quiet)
        threading.Thread(target=server.serve_forever, name="painters-metrics-http", daemon=True).start()
        return server.server_port
