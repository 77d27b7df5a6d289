"""Layer-execution policies: typed values, their compact string form and their JSON object form.

A policy says how a frozen model runs its decoder layers for one request. It is plain data, imports neither torch
nor pydantic (the GPU benchmark machine has no pydantic), and is turned into a concrete schedule by
`server.policy.compiler.compile_schedule`.

String forms (layer indices 0-based, ranges inclusive, never an ``@``):

    full                     every layer once, in order
    skip:K                   drop the K layers centred in the stack
    skip:A-B | skip:3,5,9-11 drop an explicit range or set
    pairs[:A-B]              consecutive pairs share their input (two-stage sum, arXiv 2502.02790)
    parallel[:A-B]           every layer of the range reads the same input; deltas averaged
    loop:[A-B]xR             that parallel step applied R times (loop:x3, loop:8-22x3)
    reverse[:A-B]            the range in reverse order
    shuffle[:A-B[:SEED]]     the range in a seeded random order
    repeat[:A-B]             every layer of the range replaced by the range's centre layer
    schedule:STEP,STEP,...   explicit: a layer ``7``, a run ``3-9``, or a group ``4+5+6[/mean|/sum|/pairs]``
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Combine = Literal["mean", "sum", "pairs"]
COMBINES: tuple[str, ...] = ("mean", "sum", "pairs")
RANGE_KINDS: tuple[str, ...] = ("pairs", "parallel", "loop", "reverse", "shuffle", "repeat")
KINDS: tuple[str, ...] = ("full", "skip", *RANGE_KINDS, "schedule")

SYNTAX: dict[str, str] = {
    "full": "full",
    "skip": "skip:K (K centred layers) | skip:A-B | skip:A,B,C-D",
    "pairs": "pairs | pairs:A-B",
    "parallel": "parallel | parallel:A-B",
    "loop": "loop:xR | loop:A-BxR",
    "reverse": "reverse | reverse:A-B",
    "shuffle": "shuffle | shuffle:A-B | shuffle:A-B:SEED",
    "repeat": "repeat | repeat:A-B",
    "schedule": "schedule:STEP,STEP,... with STEP = I | A-B (run in order) | I+J+K[/mean|/sum|/pairs] (parallel group)",
}


# Bounds that keep a hostile policy from costing time or memory before it meets the model's real layer range.
MAX_LAYER_INDEX = 4095
MAX_LOOP = 64
MAX_STEPS = 4096


class PolicyError(ValueError):
    """A policy that is malformed or does not fit the model; the message says what is allowed."""


def allowed_forms() -> str:
    return "; ".join(SYNTAX.values())


@dataclass(frozen=True)
class Group:
    """One explicit-schedule step: layers that read the same input, combined by `combine`."""

    layers: tuple[int, ...]
    combine: Combine = "mean"

    def __post_init__(self) -> None:
        if not self.layers:
            raise PolicyError("a schedule step needs at least one layer")
        _check_indices(self.layers)
        if self.combine not in COMBINES:
            raise PolicyError(f"unknown combine rule {self.combine!r}; allowed: {', '.join(COMBINES)}")
        if len(self.layers) == 1 and self.combine != "mean":
            object.__setattr__(self, "combine", "mean")  # one layer: every rule is the same computation


@dataclass(frozen=True)
class Policy:
    """A layer-execution policy.

    `span` is the inclusive layer range a range-taking policy acts on (None: the default middle range); for `skip`
    it is the dropped range, or `layers` the dropped set, or `count` the number of centred layers to drop.
    """

    kind: str
    span: tuple[int, int] | None = None
    count: int | None = None
    layers: tuple[int, ...] | None = None
    times: int = 1
    seed: int = 0
    steps: tuple[Group, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PolicyError(f"unknown policy kind {self.kind!r}; allowed forms: {allowed_forms()}")
        if self.span is not None:
            a, b = self.span
            if a < 0 or b < a:
                raise PolicyError(f"bad layer range {a}-{b}: need 0 <= A <= B")
            _check_indices(self.span)
        if self.count is not None and self.count < 0:
            raise PolicyError(f"skip count must be >= 0, got {self.count}")
        if self.count is not None and self.count > MAX_LAYER_INDEX:
            raise PolicyError(f"skip count must be <= {MAX_LAYER_INDEX}, got {self.count}")
        if self.layers is not None:
            if not self.layers:
                raise PolicyError("a skip set needs at least one layer")
            _check_indices(self.layers)
        if self.times < 1:
            raise PolicyError(f"loop repeat count must be >= 1, got {self.times}")
        if self.times > MAX_LOOP:
            raise PolicyError(f"loop repeat count must be <= {MAX_LOOP}, got {self.times}")
        if self.seed < 0:
            raise PolicyError(f"shuffle seed must be >= 0, got {self.seed}")
        if self.kind == "schedule" and not self.steps:
            raise PolicyError("an explicit schedule needs at least one step")
        if self.steps is not None and len(self.steps) > MAX_STEPS:
            raise PolicyError(f"an explicit schedule has at most {MAX_STEPS} steps, got {len(self.steps)}")
        if self.kind == "skip" and sum(x is not None for x in (self.count, self.span, self.layers)) != 1:
            raise PolicyError(f"skip needs exactly one of a count, a range or a set; syntax: {SYNTAX['skip']}")
        if self.kind == "skip" and self.layers is not None and _is_run(self.layers):
            # A set that is one unbroken run is that range: one canonical value for one computation.
            object.__setattr__(self, "span", (self.layers[0], self.layers[-1]))
            object.__setattr__(self, "layers", None)

    # -- string form -------------------------------------------------------------------------------------------

    def __str__(self) -> str:
        k = self.kind
        if k == "full":
            return "full"
        if k == "skip":
            if self.count is not None:
                return f"skip:{self.count}"
            if self.layers is not None:
                return f"skip:{_format_set(self.layers)}"
            return f"skip:{_format_span(self.span)}"
        if k == "schedule":
            return "schedule:" + ",".join(_format_group(g) for g in _compress_runs(self.steps or ()))
        span = "" if self.span is None else _format_span(self.span)
        if k == "loop":
            return f"loop:{span}x{self.times}"
        if k == "shuffle":
            if self.seed:
                return f"shuffle:{span}:{self.seed}"
            return f"shuffle:{span}" if span else "shuffle"
        return f"{k}:{span}" if span else k

    # -- JSON object form -------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.span is not None:
            out["start"], out["end"] = self.span
        if self.count is not None:
            out["count"] = self.count
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.kind == "loop":
            out["times"] = self.times
        if self.kind == "shuffle":
            out["seed"] = self.seed
        if self.steps is not None:
            out["steps"] = [
                g.layers[0] if len(g.layers) == 1 else {"layers": list(g.layers), "combine": g.combine}
                for g in self.steps
            ]
        return out


def _check_indices(indices: tuple[int, ...]) -> None:
    bad = [i for i in indices if not 0 <= i <= MAX_LAYER_INDEX]
    if bad:
        raise PolicyError(f"layer index {bad[0]} is out of range: layers are numbered from 0 (0-based)")


def _is_run(layers: tuple[int, ...]) -> bool:
    return list(layers) == list(range(layers[0], layers[0] + len(layers)))


def _format_span(span: tuple[int, int] | None) -> str:
    assert span is not None
    return f"{span[0]}-{span[1]}"


def _format_set(layers: tuple[int, ...]) -> str:
    """Sorted set as comma-separated runs: (3, 5, 9, 10, 11) -> '3,5,9-11'; a set of one run is always written A-B
    so that it never reads as a count."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(layers)):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    if len(runs) == 1:
        return f"{runs[0][0]}-{runs[0][1]}"
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _compress_runs(steps: tuple[Group, ...]) -> list[Group | tuple[int, int]]:
    """Consecutive single layers i, i+1, ... become one (start, end) run for the string form."""
    out: list[Group | tuple[int, int]] = []
    for g in steps:
        if len(g.layers) == 1:
            i = g.layers[0]
            last = out[-1] if out else None
            if isinstance(last, tuple) and last[1] == i - 1:
                out[-1] = (last[0], i)
                continue
            out.append((i, i))
        else:
            out.append(g)
    return out


def _format_group(g: Group | tuple[int, int]) -> str:
    if isinstance(g, tuple):
        return str(g[0]) if g[0] == g[1] else f"{g[0]}-{g[1]}"
    return "+".join(map(str, g.layers)) + f"/{g.combine}"


# -- parsing ------------------------------------------------------------------------------------------------------

_SPAN = re.compile(r"^(\d+)-(\d+)$")
_INT = re.compile(r"^\d+$")


def _parse_span(text: str, form: str) -> tuple[int, int]:
    m = _SPAN.match(text)
    if not m:
        raise PolicyError(f"bad layer range {text!r} in {form!r}: expected A-B (inclusive, 0-based)")
    return int(m[1]), int(m[2])


def parse_policy(text: str) -> Policy:
    """Parse the compact string form. Raises PolicyError naming the allowed forms."""
    s = text.strip().lower()
    if not s:
        raise PolicyError(f"empty policy; allowed forms: {allowed_forms()}")
    if "@" in s:
        raise PolicyError(f"a policy never contains '@' (got {text!r}); use it only after a model name")
    kind, _, rest = s.partition(":")
    if kind not in KINDS:
        raise PolicyError(f"unknown policy kind {kind!r} in {text!r}; allowed forms: {allowed_forms()}")
    try:
        return _parse_kind(kind, rest, s)
    except PolicyError:
        raise
    except (ValueError, TypeError) as e:  # malformed numbers and the like
        raise PolicyError(f"cannot parse policy {text!r}: {e}; {kind} syntax: {SYNTAX[kind]}") from None


def _parse_kind(kind: str, rest: str, s: str) -> Policy:
    def bad() -> PolicyError:
        return PolicyError(f"cannot parse policy {s!r}; {kind} syntax: {SYNTAX[kind]}")

    if kind == "full":
        if rest:
            raise bad()
        return Policy("full")
    if kind == "skip":
        if _INT.match(rest):
            return Policy("skip", count=int(rest))
        if _SPAN.match(rest):
            return Policy("skip", span=_parse_span(rest, s))
        if rest and all(_INT.match(p) or _SPAN.match(p) for p in rest.split(",")):
            return Policy("skip", layers=tuple(sorted(_expand_set(rest))))
        raise bad()
    if kind == "schedule":
        if not rest:
            raise bad()
        parts = rest.split(",")
        if len(parts) > MAX_STEPS:
            raise PolicyError(f"an explicit schedule has at most {MAX_STEPS} steps")
        return Policy("schedule", steps=tuple(g for part in parts for g in _parse_step(part, s)))
    if kind == "loop":
        span_text, x, times = rest.rpartition("x")
        if not x or not _INT.match(times):
            raise bad()
        return Policy("loop", span=_parse_span(span_text, s) if span_text else None, times=int(times))
    if kind == "shuffle":
        parts = rest.split(":") if rest else []
        if len(parts) > 2:
            raise bad()
        span = _parse_span(parts[0], s) if parts and parts[0] else None
        if len(parts) == 2 and not _INT.match(parts[1]):
            raise bad()
        seed = int(parts[1]) if len(parts) == 2 else 0
        return Policy("shuffle", span=span, seed=seed)
    # pairs, parallel, reverse, repeat
    return Policy(kind, span=_parse_span(rest, s) if rest else None)


def _expand_set(text: str) -> set[int]:
    out: set[int] = set()
    for p in text.split(","):
        if _INT.match(p):
            _check_indices((int(p),))
            out.add(int(p))
        else:
            a, b = _parse_span(p, text)
            _check_indices((a, b))
            if b < a:
                raise PolicyError(f"bad layer range {p!r}: need A <= B")
            out.update(range(a, b + 1))
    return out


def _parse_step(part: str, s: str) -> list[Group]:
    if _INT.match(part):
        return [Group((int(part),))]
    if _SPAN.match(part):
        a, b = _parse_span(part, s)
        _check_indices((a, b))
        if b < a:
            raise PolicyError(f"bad run {part!r} in {s!r}: need A <= B")
        return [Group((i,)) for i in range(a, b + 1)]
    members, _, combine = part.partition("/")
    layers = members.split("+")
    if len(layers) < 2 or not all(_INT.match(x) for x in layers):
        raise PolicyError(f"bad schedule step {part!r} in {s!r}; syntax: {SYNTAX['schedule']}")
    combine = combine or "mean"
    if combine not in COMBINES:
        raise PolicyError(f"unknown combine rule {combine!r} in {s!r}; allowed: {', '.join(COMBINES)}")
    return [Group(tuple(int(x) for x in layers), combine)]  # type: ignore[arg-type]


_RANGE_FIELDS = {"kind", "start", "end"}
_JSON_FIELDS: dict[str, set[str]] = {
    "full": {"kind"},
    "skip": {"kind", "start", "end", "count", "layers"},
    "pairs": _RANGE_FIELDS,
    "parallel": _RANGE_FIELDS,
    "loop": _RANGE_FIELDS | {"times"},
    "reverse": _RANGE_FIELDS,
    "shuffle": _RANGE_FIELDS | {"seed"},
    "repeat": _RANGE_FIELDS,
    "schedule": {"kind", "steps"},
}


def policy_from_json(obj: dict[str, Any]) -> Policy:
    """Parse the JSON object form, e.g. {"kind": "skip", "count": 10} or
    {"kind": "schedule", "steps": [0, 1, {"layers": [2, 3], "combine": "sum"}]}."""
    if not isinstance(obj, dict) or "kind" not in obj:
        raise PolicyError(f"a policy object needs a 'kind' (one of {', '.join(KINDS)})")
    kind = obj["kind"]
    if kind not in KINDS:
        raise PolicyError(f"unknown policy kind {kind!r}; allowed forms: {allowed_forms()}")
    known = _JSON_FIELDS[kind]
    extra = set(obj) - known
    if extra:
        raise PolicyError(f"unknown policy field(s) {sorted(extra)} for a {kind!r} policy; allowed: {sorted(known)}")

    def integer(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(f"policy field {name!r} must be an integer, got {value!r}")
        return value

    span = None
    if "start" in obj or "end" in obj:
        if "start" not in obj or "end" not in obj:
            raise PolicyError("a layer range needs both 'start' and 'end' (inclusive)")
        span = (integer("start", obj["start"]), integer("end", obj["end"]))
    steps = None
    if "steps" in obj:
        if not isinstance(obj["steps"], list):
            raise PolicyError("'steps' must be a list of layer indices or {layers, combine} groups")
        steps = tuple(_json_step(x, integer) for x in obj["steps"])
    layers = None
    if "layers" in obj:
        if not isinstance(obj["layers"], list) or not obj["layers"]:
            raise PolicyError("'layers' must be a non-empty list of layer indices")
        layers = tuple(sorted({integer("layers", x) for x in obj["layers"]}))
    return Policy(
        kind=str(kind),
        span=span,
        count=integer("count", obj["count"]) if "count" in obj else None,
        layers=layers,
        times=integer("times", obj.get("times", 1)),
        seed=integer("seed", obj.get("seed", 0)),
        steps=steps,
    )


def _json_step(x: Any, integer: Any) -> Group:
    if isinstance(x, int) and not isinstance(x, bool):
        return Group((integer("steps", x),))
    if isinstance(x, list):
        return Group(tuple(integer("steps", i) for i in x))
    if isinstance(x, dict) and isinstance(x.get("layers"), list) and set(x) <= {"layers", "combine"}:
        return Group(tuple(integer("steps", i) for i in x["layers"]), x.get("combine", "mean"))
    raise PolicyError(f"bad schedule step {x!r}: a layer index, a list of indices, or {{layers, combine}}")


def as_policy(value: str | dict[str, Any] | Policy | None) -> Policy:
    """Accept any of the forms users send: a Policy, its string form, its JSON object (or that object as a string)."""
    if value is None:
        return Policy("full")
    if isinstance(value, Policy):
        return value
    try:
        if isinstance(value, dict):
            return policy_from_json(value)
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                return policy_from_json(json.loads(value))
            except json.JSONDecodeError as e:
                raise PolicyError(f"policy looks like JSON but does not parse: {e}") from None
    except RecursionError:  # JSON nested past what the parser (or the walk over it) can follow
        raise PolicyError("policy JSON is nested too deeply: a policy object holds at most a list of steps, "
                          '{"kind": "schedule", "steps": [0, {"layers": [1, 2]}]}') from None
    if isinstance(value, str):
        return parse_policy(value)
    raise PolicyError(f"a policy is a string or an object, got {type(value).__name__}")
