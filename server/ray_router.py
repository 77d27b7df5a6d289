"""Ray Serve request router that sends a request to the replica already serving its schedule (and, without a
policy, its prompt prefix): a replica's batches are densest, and its prefix cache hits most, when it sees few distinct
schedules and repeated prefixes. Ray loads this class into its HTTP proxy (`request_router_config`).

Ray's HTTP proxy hands the router the request's ASGI scope (pickled, as it sends it to replicas), not its body, so
the routing key travels in headers that
Painters' clients set from the body they send (`clients.client.route_headers`): `x-painters-policy` (the policy as
sent; its canonical form keys the choice, so `skip:5,4` and `skip:4-5` meet) and `x-painters-prefix` (a digest of the
prompt's start). Each key has a home replica by rendezvous hashing over the live replicas, so a key moves only when
its home replica leaves. A request goes home unless home is saturated (its queue is `imbalance` requests longer than
the shortest), then to the least-loaded replica; a request without headers goes to the least loaded of two random
replicas, as under Ray's default router.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from server.policy.policy import PolicyError, as_policy

POLICY_HEADER = b"x-painters-policy"
PREFIX_HEADER = b"x-painters-prefix"


def routing_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key a request is routed by: its canonical policy (and prefix digest), or None when it carries neither."""
    found = {k.lower(): v.decode("latin-1") for k, v in headers if k.lower() in (POLICY_HEADER, PREFIX_HEADER)}
    policy, prefix = found.get(POLICY_HEADER), found.get(PREFIX_HEADER)
    if policy is not None:
        try:
            policy = str(as_policy(policy))
        except (PolicyError, ValueError, RecursionError):  # a preset name, a malformed or hostile policy (nested
            pass  # JSON deep enough to exhaust the stack): the server names the error; route it as sent
    if policy is None and prefix is None:
        return None
    return policy if policy is not None else f"prefix:{prefix}"


def request_scope(arg: Any) -> dict[str, Any] | None:
    """The ASGI scope of a request as the router receives it. Ray's HTTP proxy sends a replica the request as a
    pickled `StreamingHTTPRequest` (raw bytes, to skip cloudpickle), and the router sees those bytes; a handle call
    passes an object. (The bytes are the proxy's own, made in this process.) Reading only `.asgi_scope` off the
    argument found nothing on the bytes, and every request went the keyless way."""
    if isinstance(arg, (bytes, bytearray)):
        try:
            arg = pickle.loads(arg)
        except Exception:  # noqa: BLE001 -- not a request this router knows: route it without a key
            return None
    scope = getattr(arg, "asgi_scope", None)
    return scope if isinstance(scope, dict) else None


def rendezvous(key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Replicas by their score for `key`, best first (highest-random-weight hashing)."""
    def score(r: RunningReplica) -> bytes:
        return hashlib.blake2b(f"{key}\0{r.replica_id.unique_id}".encode(), digest_size=8).digest()
    return sorted(replicas, key=score, reverse=True)


class ScheduleAffinityRouter(RequestRouter):
    """Without Ray's FIFOMixin, as Ray's own key-based routers: it hands each chosen replica to the oldest waiting
    request whatever key the replica was chosen for, so two requests could swap homes."""

    def initialize_state(self, *, imbalance: int = 8) -> None:
        self.imbalance = imbalance

    def _load(self, r: RunningReplica) -> int:
        """Requests on `r`: the proxy's own count (probed or updated as it sends), else what `r` last reported."""
        cached = self.replica_queue_len_cache.get(r.replica_id)
        if cached is not None:
            return cached
        stats = r.routing_stats or {}
        return int(stats.get("running", 0)) + int(stats.get("waiting", 0))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = None
        if pending_request is not None and pending_request.args:
            scope = request_scope(pending_request.args[0])
            if scope is not None:
                key = routing_key(scope.get("headers", []))
        by_load = sorted(candidate_replicas, key=self._load)
        if key is None:
            two = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
            return [sorted(two, key=self._load), by_load]
        home = rendezvous(key, candidate_replicas)[0]
        if self._load(home) - self._load(by_load[0]) >= getattr(self, "imbalance", 8):
            return [by_load]  # home is saturated: least loaded first
        return [[home], [r for r in by_load if r is not home]]
