"""The schedule-affinity router's choices on hand-made replicas (no Ray cluster): the key is the canonical policy,
a key's home replica is stable and moves only when that replica leaves, a saturated home sends the request to the
least loaded replica, and a request without routing headers gets two random replicas, less loaded first. Also the
routing headers Painters' clients send."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray.serve.request_router", reason="needs painters[ray]")

from ray.serve._private.request_router.common import ReplicaQueueLengthCache  # noqa: E402

from clients.client import route_headers  # noqa: E402
from server.ray_router import ScheduleAffinityRouter, rendezvous, routing_key  # noqa: E402


@dataclass(frozen=True)
class ReplicaID:
    unique_id: str


@dataclass
class Replica:
    unique_id: str
    routing_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def replica_id(self) -> ReplicaID:
        return ReplicaID(self.unique_id)


def router(loads: dict[str, int] | None = None) -> ScheduleAffinityRouter:
    r = object.__new__(ScheduleAffinityRouter)  # its routing logic only; Ray's constructor wants a live deployment
    r.initialize_state(imbalance=4)
    r._replica_queue_len_cache = ReplicaQueueLengthCache()
    for rid, n in (loads or {}).items():
        r._replica_queue_len_cache.update(ReplicaID(rid), n)  # type: ignore[arg-type]
    return r


def request(*, handle_call: bool = False, **headers: str) -> SimpleNamespace:
    """A pending request as the router sees it: from Ray's HTTP proxy, the pickled `StreamingHTTPRequest` it sends
    replicas (bytes); with `handle_call`, the object a deployment handle passes."""
    import pickle

    from ray.serve._private.common import StreamingHTTPRequest

    scope = {"headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}
    arg = StreamingHTTPRequest(asgi_scope=scope, proxy_actor_name="proxy")
    return SimpleNamespace(args=[arg if handle_call else pickle.dumps(arg)])


def choose(r: ScheduleAffinityRouter, replicas: list[Replica], req: SimpleNamespace) -> list[list[str]]:
    ranks = asyncio.run(r.choose_replicas(replicas, req))  # type: ignore[arg-type]
    return [[x.unique_id for x in rank] for rank in ranks]


def test_key_is_the_canonical_policy_else_the_prefix() -> None:
    hostile = b'{"kind":' + b"[" * 5000  # nested deep enough to exhaust the parser's stack: routed as sent
    assert routing_key([(b"x-painters-policy", hostile)]) == hostile.decode()
    assert routing_key([(b"x-painters-policy", b"skip:5,4")]) == routing_key([(b"X-Painters-Policy", b" skip:4-5")])
    assert routing_key([(b"x-painters-policy", b"full"), (b"x-painters-prefix", b"ab")]) == "full"
    assert routing_key([(b"x-painters-prefix", b"ab")]) == "prefix:ab"
    assert routing_key([(b"x-painters-policy", b"fast")]) == "fast"  # a preset name routes as sent
    assert routing_key([(b"authorization", b"Bearer k")]) is None


def test_home_replica_is_stable_and_moves_only_when_it_leaves() -> None:
    replicas = [Replica(f"r{i}") for i in range(4)]
    homes = {k: rendezvous(k, replicas)[0].unique_id for k in (f"skip:{i}" for i in range(1, 40))}
    assert len(set(homes.values())) == 4  # keys spread over every replica
    survivors = [r for r in replicas if r.unique_id != "r0"]
    for key, home in homes.items():
        new = rendezvous(key, survivors)[0].unique_id
        assert new == home or home == "r0"


def test_request_goes_home_unless_home_is_saturated() -> None:
    replicas = [Replica("a"), Replica("b"), Replica("c")]
    req = request(x_painters_policy="skip:4")
    home = rendezvous(routing_key([(b"x-painters-policy", b"skip:4")]), replicas)[0].unique_id  # type: ignore[arg-type]
    others = sorted({"a", "b", "c"} - {home})
    ranks = choose(router({home: 3, others[0]: 0, others[1]: 1}), replicas, req)
    assert ranks == [[home], [others[0], others[1]]]
    ranks = choose(router({home: 9, others[0]: 5, others[1]: 2}), replicas, req)
    assert ranks == [[others[1], others[0], home]]  # home 7 above the least loaded: least loaded first


def test_reported_load_counts_when_the_proxy_has_none() -> None:
    replicas = [Replica("a", {"running": 8, "waiting": 4}), Replica("b", {"running": 1, "waiting": 0})]
    ranks = choose(router(), replicas, request())  # no headers: two random, less loaded first
    assert ranks[0] == ["b", "a"]


def test_clients_send_policy_and_prefix_headers() -> None:
    h = route_headers({"prompt": "x" * 300, "policy": "skip:4"})
    assert h["x-painters-policy"] == "skip:4"
    assert h["x-painters-prefix"] == route_headers({"prompt": "x" * 256 + "different tail"})["x-painters-prefix"]
    assert route_headers({"prompt": "y" * 300})["x-painters-prefix"] != h["x-painters-prefix"]
    assert route_headers({"inputs": "hi", "parameters": {"policy": {"kind": "full"}}})["x-painters-policy"] == \
        '{"kind": "full"}'
    assert route_headers({"messages": [{"role": "user", "content": "hi"}]})["x-painters-prefix"]
    assert route_headers({"prompt": [[1, 2, 3]]})["x-painters-prefix"]


def test_the_key_is_read_from_what_rays_proxy_sends_and_from_a_handle_call() -> None:
    """Ray's HTTP proxy hands the router pickled bytes, not an object with `asgi_scope`: read as an object, every
    request had no key and went to two random replicas, in production, while tests of hand-made objects passed."""
    replicas = [Replica("a"), Replica("b"), Replica("c")]
    home = rendezvous("skip:4", replicas)[0].unique_id
    for handle_call in (False, True):
        ranks = choose(router(), replicas, request(handle_call=handle_call, x_painters_policy="skip:4"))
        assert ranks[0] == [home], (handle_call, ranks)
    assert choose(router(), replicas, SimpleNamespace(args=[b"not a pickle"]))[0] != []  # keyless, not an error
