"""What handlers share: the loaded engine and its loop, presets, whether the server admits work, and the limits a
request must meet (each refusal names the limit).

A request's policy comes from (1) its `policy` field, (2) a model-name suffix `model@policy` or `model@preset`,
(3) the server's default; all three are validated the same way, and bounded in size before they are parsed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.api.errors import APIError
from server.api.protocol import ModelCard, ModelPermission, PoliciesInfo, PolicyKind
from server.api.responses_background import BackgroundTasks
from server.api.responses_store import ResponseStore
from server.policy.compiler import Schedule, default_span, examples
from server.metrics import Metrics
from server.policy.policy import KINDS, SYNTAX, PolicyError, allowed_forms
from server.settings import Settings

if TYPE_CHECKING:
    from server.engine.loop import EngineLoop
    from server.engine.served import ServedModel

log = logging.getLogger(__name__)
HANDLER_GRACE_S = 5.0  # after a drain, for the handlers of ended requests to write their last answers


@dataclass
class AppState:
    settings: Settings
    model_name: str
    metrics: Metrics
    presets: dict[str, str] = field(default_factory=dict)  # name -> canonical policy
    served: ServedModel | None = None
    loop: EngineLoop | None = None
    load_error: str | None = None
    draining: bool = False  # SIGTERM: /ready is 503 and new requests are refused while running ones finish
    in_flight: int = 0  # HTTP requests being answered (counted by the guard; a drain waits for them)
    allowed: frozenset[str] | None = None  # allowed_policies in canonical form, compiled at start (None: any)
    started: int = field(default_factory=lambda: int(time.time()))  # the models' `created`, the same on every call
    responses: ResponseStore | None = None  # kept /v1/responses answers, where settings.responses_store
    background: BackgroundTasks | None = None  # background /v1/responses running (create_app's)

    @property
    def max_model_len(self) -> int:
        """What the server enforces: the setting, capped by the model's own position limit."""
        if self.served is None:
            return self.settings.max_model_len
        return min(self.settings.max_model_len, self.served.max_model_len)

    @property
    def ready(self) -> bool:
        return self.loop is not None and self.loop.alive and not self.draining

    @property
    def engine_failure(self) -> str | None:
        """Why the engine thread died, once it has (the process should then be restarted)."""
        if self.loop is None or not self.loop.failed:
            return None
        return self.loop.failure or "the engine thread stopped"

    @property
    def vocab_size(self) -> int:
        served, _ = self.require()
        return served.vocab_size

    def drain(self, timeout: float) -> None:
        """Shut down gently: refuse new requests (503, `/ready` too), let running and waiting ones finish for
        `timeout` seconds, end the rest with finish_reason "abort", and wait briefly for their handlers to answer."""
        self.draining = True
        loop = self.loop
        log.warning("shutdown: refusing new requests; %d running or waiting may finish within %.0f s",
                    loop.num_running + loop.num_waiting if loop else 0, timeout)
        if loop is not None:
            aborted = loop.drain(time.monotonic() + timeout)
            if aborted:
                log.warning("shutdown: %d request(s) did not finish within %.0f s and ended with finish_reason "
                            "'abort'", aborted, timeout)
        grace = time.monotonic() + HANDLER_GRACE_S
        while self.in_flight and time.monotonic() < grace:
            time.sleep(0.02)
        log.info("shutdown: drained")

    def check_admitting(self) -> None:
        """Refuse early, before any tokenizing: 503 while draining, 429 while the waiting queue is full."""
        _, loop = self.require()
        if self.draining or loop.draining:
            raise self.draining_error()
        if loop.num_waiting >= self.settings.queue_capacity:
            raise self.busy_error(f"{loop.num_waiting} requests already waiting (capacity "
                                  f"{self.settings.queue_capacity})")

    def busy_error(self, detail: str) -> APIError:
        return APIError(429, f"server busy: {detail}; retry later", headers={"Retry-After": "1"}, code="queue_full")

    @staticmethod
    def draining_error() -> APIError:
        return APIError(503, "the server is shutting down; retry on another replica or after the restart",
                        headers={"Retry-After": "5", "Connection": "close"}, code="shutting_down")

    def require(self) -> tuple[ServedModel, EngineLoop]:
        if self.engine_failure is not None:
            raise APIError(503, f"the engine failed ({self.engine_failure}); the server is restarting",
                           code="engine_failed")
        if self.served is None or self.loop is None:
            detail = f"model failed to load: {self.load_error}" if self.load_error else "model is still loading"
            raise APIError(503, f"{detail}; retry when GET /ready answers 200", headers={"Retry-After": "5"})
        return self.served, self.loop

    # -- policies ----------------------------------------------------------------------------------------------

    def policy_help(self, message: str = "") -> str:
        """What a user may send, for error messages (without repeating what `message` already says)."""
        n = self.served.num_layers if self.served else None
        parts = [] if "allowed forms" in message else [f"allowed forms: {allowed_forms()}"]
        parts.append(f"this model's layers are 0-{n - 1}" if n else "layer range known once loaded")
        if self.presets:
            parts.append(f"presets: {', '.join(self.presets)}")
        return "; ".join(parts)

    def resolve_policy(self, model: str | None, policy: str | dict | None) -> Schedule:
        """Model name (maybe with @suffix) and body policy -> compiled schedule; 404/400 on what is wrong."""
        served, _ = self.require()
        self._check_policy_size(model, policy)
        suffix = None
        if model:
            base, at, suffix_text = model.partition("@")
            suffix = suffix_text if at else None
            if base != self.model_name:
                raise APIError(404, f"model {base!r} not found; this server serves {self.model_name!r} "
                                    f"(optionally {self.model_name}@POLICY or @PRESET)", param="model",
                               code="model_not_found")
            if at and not suffix_text:
                raise APIError(400, f"empty policy after '@' in model {model!r}; {self.policy_help()}", param="model")
        chosen: Any = policy if policy is not None else suffix
        if chosen is None:
            chosen = self.settings.default_policy
        if isinstance(chosen, str) and chosen in self.presets:
            chosen = self.presets[chosen]
        try:
            schedule = served.compile(chosen)
        except PolicyError as e:
            raise APIError(400, f"invalid policy {chosen!r}: {e}; {self.policy_help(str(e))}", param="policy",
                           code="invalid_policy") from None
        if len(schedule.steps) > self.settings.max_schedule_steps:
            raise APIError(400, f"policy {schedule.policy[:80]!r} compiles to {len(schedule.steps)} steps; this server "
                                f"runs at most {self.settings.max_schedule_steps} (max_schedule_steps)",
                           param="policy", code="schedule_too_long")
        if self.allowed is not None and schedule.policy not in self.allowed:
            raise APIError(400, f"policy {schedule.policy!r} is not allowed on this server; allowed: "
                                f"{', '.join(sorted(self.allowed))}", param="policy", code="policy_not_allowed")
        return schedule

    def _check_policy_size(self, model: str | None, policy: str | dict | None) -> None:
        """Bound what the parser sees: a policy string (or model@suffix) of at most max_policy_chars characters, and
        a JSON policy no larger once serialized."""
        limit = self.settings.max_policy_chars
        for param, value in (("model", model), ("policy", policy)):
            if value is None:
                continue
            size = len(value) if isinstance(value, str) else len(json.dumps(value))
            if size > limit + (len(self.model_name) + 1 if param == "model" else 0):
                raise APIError(400, f"{param} is {size} characters; a policy may have at most {limit} "
                                    "(max_policy_chars); use a preset or a shorter form such as a range",
                               param=param, code="policy_too_long")

    def policies_info(self) -> PoliciesInfo:
        n = self.served.num_layers if self.served else None
        return PoliciesInfo(
            kinds=[PolicyKind(kind=k, syntax=SYNTAX[k]) for k in KINDS],
            num_layers=n,
            layer_range=f"0-{n - 1}" if n else None,
            default_range="{}-{}".format(*default_span(n)) if n else None,
            default_policy=self.settings.default_policy,
            presets=self.presets,
            allowed_policies=self.settings.allowed_policies,
            examples=examples(n),
            max_policy_chars=self.settings.max_policy_chars,
            max_schedule_steps=self.settings.max_schedule_steps,
        )

    # -- model names -------------------------------------------------------------------------------------------

    def model_cards(self) -> list[ModelCard]:
        """/v1/models: the served name and one NAME@PRESET per preset (vLLM's cards: root is what --model loaded,
        parent the base name of a derived one)."""
        cards = [self._card(self.model_name, self.settings.default_policy, parent=None)]
        cards += [self._card(f"{self.model_name}@{name}", policy, parent=self.model_name)
                  for name, policy in self.presets.items()]
        return cards

    def model_card(self, name: str) -> ModelCard:
        """OpenAI's model retrieve: a listed name's card, or NAME@POLICY's for a policy this server runs; else
        OpenAI's 404 (code model_not_found), naming the served names."""
        for card in self.model_cards():
            if card.id == name:
                return card
        base, at, _ = name.partition("@")
        why = ""
        if base == self.model_name and at:
            try:
                schedule = self.resolve_policy(name, None)
            except APIError as e:
                if e.status != 400:  # 503: not loaded yet
                    raise
                why = f" ({e.message})"
            else:
                return self._card(name, schedule.policy, parent=self.model_name)
        served = ", ".join(repr(c.id) for c in self.model_cards())
        raise APIError(404, f"model {name!r} not found{why}; this server serves {served}, and "
                            f"{self.model_name}@POLICY for any policy it runs", param="model", code="model_not_found")

    def _card(self, name: str, policy: str, *, parent: str | None) -> ModelCard:
        return ModelCard(id=name, created=self.started, max_model_len=self.max_model_len, policy=policy,
                         root=self.settings.model, parent=parent,
                         permission=[ModelPermission(id=f"modelperm-{name}", created=self.started)])

    # -- prompts -----------------------------------------------------------------------------------------------

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        limit = self.max_model_len
        if prompt_len > limit:
            raise APIError(400, f"prompt has {prompt_len} tokens but this server allows at most {limit} "
                                f"(max_model_len); shorten the prompt", param="prompt", code="context_length_exceeded")
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens (max_model_len), but "
                                f"{prompt_len} prompt tokens + {max_tokens} max_tokens = {prompt_len + max_tokens}; "
                                "lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")

    def default_max_tokens(self, prompt_len: int, schedule: Schedule) -> int:
        """max_tokens for a request that leaves it out: the rest of the context, as in vLLM, but no more than the KV
        budget holds under its policy (tokens are reserved up front: the whole context could exceed the budget,
        and the request would be refused for a limit its client never set)."""
        _, loop = self.require()
        return max(0, min(self.max_model_len, loop.longest(schedule)) - prompt_len)
