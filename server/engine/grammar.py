"""Structured outputs through xgrammar (the library vLLM and SGLang use): a `StructuredOutput` compiled for the model's
tokenizer (`Grammars`; xgrammar caches what it compiled, within a byte bound, as vLLM configures it), the matcher that
follows one request's tokens (`Matcher`: host state that lives with its `Request`), and the bitmask of the tokens each
structured row may choose next (`bitmask`), which `server.engine.sampling` applies on the device.

xgrammar is imported on first use, or ahead of it on a background thread (`Grammars.warm`, at server start): a
server without it starts and serves, and a structured request is refused with `GrammarUnavailable` naming the package.

A request's compile is bounded in time (`Grammars.compile_within`): it runs on one of COMPILE_SLOTS threads, and a
request whose grammar is not compiled by its deadline is refused (a 400, as vLLM refuses a regex that does not compile
within VLLM_REGEX_COMPILATION_TIMEOUT_S). xgrammar compiles in native code that cannot be interrupted, so a compile
past its deadline runs on to its end in its slot (its grammar then cached: the same spec asked again is at once); the
slots bound how many cores such compiles hold, and a request that finds them all busy past its deadline is told to
retry (`GrammarBusy`). vLLM kills its regex compiles instead (a pool of processes it SIGKILLs,
vllm/v1/structured_output/utils.py, compile_regex_with_timeout) and leaves schema and grammar compiles unbounded; a
process here would re-import xgrammar and rebuild the tokenizer's tables (seconds, and a second interpreter's memory)
beside the model on the same cores, and ship each compiled grammar (megabytes) between processes. Measured on
SmolLM2's vocabulary: repetition is cheap (`[a-z]{1,100000}`, nested counts: well under a second), size is not (a
schema of 5000 properties, ~100 KB, takes ~2.5 s; the 2 MB body allows far more).
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.engine.sampling_params import StructuredOutput

if TYPE_CHECKING:
    from torch import Tensor

GRAMMAR_CACHE_BYTES = 256 * 2**20  # compiled grammars kept for reuse (vLLM's VLLM_XGRAMMAR_CACHE_MB: 512)
COMPILE_THREADS = 2  # xgrammar's threads per compile (vLLM's 8; this serves beside the model on the same cores)
COMPILE_SLOTS = 2  # requests' compiles at once (each up to COMPILE_THREADS threads)
COMPILE_TIMEOUT_S = 10.0  # a request's wait for its compile, a slot included
WHAT = {"json": "the JSON schema", "json_object": "the JSON object grammar", "regex": "the regular expression",
        "choice": "the choices", "grammar": "the EBNF grammar", "lark": "the Lark grammar",
        "structural_tag": "the structural tag"}


class GrammarError(ValueError):
    """A structured output that does not compile; the message names what failed (the client's to fix)."""


class GrammarUnavailable(RuntimeError):
    """Structured outputs cannot be served here: xgrammar is missing, or cannot read this model's tokenizer."""


class GrammarBusy(RuntimeError):
    """Every compile slot stayed busy (with other requests' compiles) past a request's deadline: retry."""


@dataclass(frozen=True)
class Grammar:
    """A compiled structured output: one matcher per request (per choice) that follows it."""

    compiled: Any  # xgrammar.CompiledGrammar

    def matcher(self) -> Matcher:
        return Matcher(self.compiled)


class Matcher:
    """One request's place in its grammar (xgrammar's GrammarMatcher), advanced by each token it chooses. It ends
    (`terminated`) when it accepts a stop token the grammar allows at its end: the model chooses when to stop there,
    as in vLLM. Past its end (a request with ignore_eos decodes on) it constrains nothing and takes every token, as
    vLLM's XgrammarGrammar does."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self._past_end = 0  # tokens taken after it terminated (the grammar never saw them)

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (and unmoved) when the grammar does not allow it here."""
        if self.terminated:
            self._past_end += 1
            return True
        return bool(self._matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def rollback(self, n: int) -> None:
        """Forget the last n tokens accepted (those past its end first)."""
        past = min(n, self._past_end)
        self._past_end -= past
        if n > past:
            self._matcher.rollback(n - past)

    def fork(self) -> Matcher:
        """A matcher of its own at this one's place (xgrammar's fork: a copy of the parse state, not a replay of
        the tokens). Measured on SmolLM2 under a JSON schema: ~2 us after 25 tokens (replaying them: ~26 us), ~14 us
        after 900; its memory is that of any matcher, whose history grows ~0.4 KB a token (~18 KB after 20 tokens,
        ~380 KB after 900: xgrammar 0.2.9 keeps it whatever max_rollback_tokens says)."""
        twin = object.__new__(Matcher)
        twin._matcher, twin._past_end = self._matcher.fork(), self._past_end
        return twin

    def fill(self, mask: Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of `mask` (see `bitmask`)."""
        self._matcher.fill_next_token_bitmask(mask, row)


def bitmask(matchers: Sequence[Matcher], vocab_size: int) -> Tensor:
    """[R, ceil(vocab_size / 32)] int32 on the host: bit t % 32 of word t // 32 in row r is set when matchers[r]
    allows token t next (xgrammar's layout; tokens the tokenizer lacks, past its vocabulary, are never set)."""
    import xgrammar as xgr

    mask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for r, m in enumerate(matchers):
        m.fill(mask, r)
    return mask


class Grammars:
    """Compiles structured outputs for one model's tokenizer. Thread-safe: the HTTP pipeline compiles on worker
    threads, at admission, and the engine offline."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_ids: frozenset[int],
                 cache_bytes: int = GRAMMAR_CACHE_BYTES, compile_timeout: float = COMPILE_TIMEOUT_S) -> None:
        """vocab_size: the model's (its embedding may be padded past the tokenizer's). stop_ids: the tokens that end
        a request, which the grammar allows at its end. compile_timeout: `compile_within`'s deadline, seconds."""
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, stop_ids
        self._cache_bytes, self.compile_timeout = cache_bytes, compile_timeout
        self._slots = ThreadPoolExecutor(COMPILE_SLOTS, thread_name_prefix="xgrammar-compile")  # threads made on use
        self._compiler: Any = None
        self._unavailable: str | None = None  # why no compiler can be made (found once)
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> Grammar:
        """Raises GrammarError naming what failed, GrammarUnavailable where nothing can compile."""
        compiler = self._get_compiler()
        what = WHAT["lark" if spec.kind == "grammar" and is_lark(str(spec.spec)) else spec.kind]
        if any("\x00" in s for s in ((spec.spec,) if isinstance(spec.spec, str) else spec.spec)):
            # as vLLM: xgrammar's native parsers do not handle a NUL, and no output could hold one meaningfully
            raise GrammarError(f"{spec.param}: {what} must not contain a NUL character ('\\x00')")
        try:
            return Grammar(_compile(compiler, spec))
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(f"{spec.param}: {what} does not compile: {_reason(e)}") from None

    def compile_within(self, spec: StructuredOutput) -> Grammar:
        """`compile` in a compile slot, within `compile_timeout` seconds (see the module's docstring). Raises
        GrammarError (its deadline passed too: the spec is too large to serve), GrammarBusy (it waited for a slot
        past its deadline, or most of it: a compile given less than half its time is not judged too large),
        GrammarUnavailable."""
        submitted, started = time.monotonic(), []

        def run() -> Grammar:
            started.append(time.monotonic())
            return self.compile(spec)

        future: Future[Grammar] = self._slots.submit(run)
        try:
            return future.result(timeout=self.compile_timeout)
        except FutureTimeout:
            if future.cancel():  # it never started
                raise GrammarBusy(f"every structured-output compile slot ({COMPILE_SLOTS}) stayed busy for "
                                  f"{self.compile_timeout:g} s; retry") from None
            waited = started[0] - submitted if started else self.compile_timeout
            if waited > self.compile_timeout / 2:  # its grammar is cached once done: a retry is quick
                raise GrammarBusy(f"the structured-output compile slots ({COMPILE_SLOTS}) were busy for {waited:.2g} "
                                  f"of its {self.compile_timeout:g} s; retry") from None
            what = WHAT["lark" if spec.kind == "grammar" and is_lark(str(spec.spec)) else spec.kind]
            raise GrammarError(f"{spec.param}: {what} does not compile within {self.compile_timeout:g} s: make it "
                               "smaller or simpler") from None

    def warm(self) -> threading.Thread:
        """Import xgrammar and build the compiler on a daemon thread (what a first structured request would
        otherwise wait for); a request that comes first waits for it. Whether it worked, `compile` says."""
        def build() -> None:
            with self._lock:
                if self._compiler is None and self._unavailable is None:
                    self._compiler = self._make_compiler()

        thread = threading.Thread(target=build, name="xgrammar-warm", daemon=True)
        thread.start()
        return thread

    def matcher(self, spec: StructuredOutput) -> Matcher:
        return self.compile(spec).matcher()

    @property
    def cached_bytes(self) -> int:
        """What xgrammar's cache of compiled grammars holds (0 before the first compile)."""
        return 0 if self._compiler is None else int(self._compiler.get_cache_size_bytes())

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None and self._unavailable is None:
                self._compiler = self._make_compiler()
            if self._unavailable is not None:
                raise GrammarUnavailable(self._unavailable)
            return self._compiler

    def _make_compiler(self) -> Any:
        try:
            import xgrammar as xgr
        except ImportError as e:
            self._unavailable = (f"structured outputs need the xgrammar package, which this server cannot import "
                                 f"({e}); install it (pip install xgrammar) and restart")
            return None
        try:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=sorted(self._stop_ids) or None)
        except Exception as e:  # noqa: BLE001 - any tokenizer xgrammar cannot read
            self._unavailable = (f"structured outputs are not available for this model: xgrammar cannot read its "
                                 f"tokenizer ({type(e).__name__}: {e})")
            return None
        return xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=True,
                                   cache_limit_bytes=self._cache_bytes)


def _compile(compiler: Any, spec: StructuredOutput) -> Any:
    # any_whitespace=False as vLLM's disable_any_whitespace compiles it (backend_xgrammar.py): xgrammar's default
    # separators, ", " and ": ", and no other whitespace outside strings
    if spec.kind == "json":
        return compiler.compile_json_schema(spec.spec, any_whitespace=spec.any_whitespace)
    if spec.kind == "json_object":  # any JSON object, as vLLM compiles it
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=spec.any_whitespace)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.spec)
    if spec.kind == "choice":
        return compiler.compile_grammar(choice_grammar(spec.spec))
    if spec.kind == "structural_tag":
        return _compile_structural_tag(compiler, spec.spec)
    if is_lark(spec.spec):  # as vLLM: xgrammar's own Lark reader (its compile_lark), rule `start` the whole output
        return compiler.compile_lark(spec.spec)
    return compiler.compile_grammar(spec.spec)


def _compile_structural_tag(compiler: Any, spec: str) -> Any:
    """As vLLM's backend_xgrammar.py: the older form (structures and triggers) through xgrammar's deprecated
    (tags, triggers) call, the newer one ({"format": ...}) as it is."""
    import xgrammar as xgr

    tag = json.loads(spec)
    if "structures" not in tag:
        return compiler.compile_structural_tag(spec)
    try:
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                 for s in tag["structures"]]
        triggers = list(tag["triggers"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"the older form takes structures: [{{\"begin\": ..., \"schema\": {{...}}, \"end\": ...}}] "
                         f"and triggers: [...] (missing {e})") from None
    return compiler.compile_structural_tag(items, triggers)


def is_lark(grammar: str) -> bool:
    """Whether a grammar is Lark rather than EBNF: no line (comments aside) defines a rule with `::=` (vLLM's
    grammar_is_likely_lark, vllm/v1/structured_output/utils.py)."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in grammar.split("\n"))


def choice_grammar(choices: Sequence[str]) -> str:
    """The EBNF grammar whose outputs are exactly `choices` (JSON's string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _reason(e: Exception) -> str:
    """xgrammar's message without its log prefix ("[12:31:48] /project/cpp/x.cc:94: ", "Check failed: ... is
    false: ")."""
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(e).strip())  # also inside a Lark error, for its regexes
    if text.startswith("Lark error"):  # its first line says where and what; the rest quotes the line with a caret
        text = text.split("\n", 1)[0]
    return re.sub(r"^Check failed: .*? is false: ", "", text)
