"""Structured outputs (server/engine/grammar.py) through the real xgrammar: what compiles and what is refused, the
matcher and the bitmask on SmolLM2's tokenizer, a server without xgrammar; and the engine decoding the real SmolLM2
under a grammar: JSON valid against its schema, one of the choices, a full match of the regex, greedy and sampled,
beside unconstrained rows (which decode as alone), overlapped or not."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
from typing import Any

import jsonschema
import pytest

from server.engine.generate import Batch, Engine, Launched
from server.engine.grammar import (
    COMPILE_SLOTS, GrammarBusy, GrammarError, Grammars, GrammarUnavailable, bitmask, is_lark,
)
from server.engine.sampling import unpack_bitmask
from server.engine.sampling_params import SamplingParams, StructuredOutput
from tests.conftest import CharTokenizer
from tests.serving import wait_until

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}

def chat(text: str) -> str:
    """SmolLM2's chat template around one user message (which its answer follows)."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


ASK = chat("Describe a person as JSON with a name and an age.")
ASKS = [ASK, chat("Give me a JSON object about a famous scientist: name and age."),
        chat("Who are you? Answer in JSON.")]
PLAIN = "The capital of France is Paris. The capital of Italy is"
# one grammar twice: EBNF (rule root) and Lark (rule start)
CITY_EBNF = 'root ::= " " city " is in " country "."\ncity ::= "Rome" | "Milan"\ncountry ::= "Italy" | "France"'
CITY_LARK = 'start: " " city " is in " country "."\ncity: "Rome" | "Milan"  // a comment\ncountry: "Italy" | "France"'


def person() -> StructuredOutput:
    return StructuredOutput("json", json.dumps(PERSON))


@pytest.fixture(scope="module")
def grammars(smollm2) -> Grammars:
    return Grammars(smollm2.tokenizer, vocab_size=smollm2.config.vocab_size, stop_ids=smollm2.eos_token_ids)


def _accepts(grammars: Grammars, spec: StructuredOutput, text: str, *, tokenizer) -> bool:
    """Whether `text`'s tokens, then an EOS, take a fresh matcher to its end."""
    m = grammars.matcher(spec)
    return all(m.accept(t) for t in tokenizer.encode(text, add_special_tokens=False)) and m.accept(2) and m.terminated


# -- compiling ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_choices_match_exactly_themselves_whatever_they_hold(smollm2, grammars):
    """Quotes, backslashes, newlines, non-ASCII and the empty string are each a choice of their own; a choice's
    prefix or extension is not one."""
    choices = ('say "hi"', "back\\slash", "two\nlines", "café ☕", "", "yes", "yes sir")
    spec = StructuredOutput("choice", choices)
    for c in choices:
        assert _accepts(grammars, spec, c, tokenizer=smollm2.tokenizer), c
    for other in ("ye", "yes si", "no", 'say "hi" ', "café"):
        assert not _accepts(grammars, spec, other, tokenizer=smollm2.tokenizer), other


@pytest.mark.slow
@pytest.mark.parametrize("kind,spec,says", [
    ("json", '{"type": "foo"}', ('the JSON schema does not compile: Unsupported type "foo"',)),
    ("json", '{"type": "object"', ("the JSON schema does not compile", "Failed to parse JSON")),
    ("regex", "(ab", ("the regular expression does not compile", "parenthesis is not closed")),
    ("regex", "a\x00b", ("must not contain a NUL character",)),
    ("grammar", 'root ::= "a" rest', ("the EBNF grammar does not compile", 'Rule "rest" is not defined')),
    ("grammar", 'start ::= "a"', ('root rule with name "root" is not found',)),
    ("grammar", 'start: "a" rest', ("the Lark grammar does not compile", "line 1, column 12: unknown name 'rest'")),
    ("grammar", 'start: ("a"', ("the Lark grammar does not compile", "expected ')' after group")),
    ("grammar", 'greeting: "hi"', ("the Lark grammar does not compile", "no start rule found")),
    ("grammar", "start: /[a-/", ("the Lark grammar does not compile", "failed to compile regular expression")),
    ("structural_tag", '{"type": "structural_tag", "format": {"type": "bogus"}}',
     ("the structural tag does not compile", "Format type not recognized: bogus")),
    ("structural_tag", '{"type": "structural_tag", "structures": [{"begin": "<a>"}], "triggers": ["<a"]}',
     ("the structural tag does not compile", "'schema'")),
])
def test_what_does_not_compile_is_a_grammar_error_naming_it(grammars, kind, spec, says):
    with pytest.raises(GrammarError) as e:
        grammars.compile(StructuredOutput(kind, spec, param="guided_x"))
    assert str(e.value).startswith("guided_x: ") and "/project/" not in str(e.value), e.value  # no log prefix
    for fragment in says:
        assert fragment in str(e.value), (fragment, str(e.value))


@pytest.mark.slow
def test_compiled_grammars_are_cached_within_a_bound(smollm2):
    """The same spec compiles once (a second request reuses it); distinct ones past the bound evict the oldest, so
    the cache holds at most the bound and the newest grammar (here a dozen would be ~30 MB)."""
    tok = smollm2.tokenizer
    grammars = Grammars(tok, vocab_size=len(tok), stop_ids=smollm2.eos_token_ids, cache_bytes=4 * 2**20)
    grammars.compile(StructuredOutput("regex", "[a-z]{1,3000}"))
    one = grammars.cached_bytes
    assert one > 2**20
    grammars.compile(StructuredOutput("regex", "[a-z]{1,3000}"))
    assert grammars.cached_bytes == one
    for n in range(3001, 3013):
        grammars.compile(StructuredOutput("regex", f"[a-z]{{1,{n}}}"))
        assert grammars.cached_bytes <= 4 * 2**20 + one


def _slots_held(smollm2: Any, *, first: int, size: int = 300) -> Grammars:
    """SmolLM2's grammars with every compile slot holding a slow compile that its request gave up on (0.02 s
    deadline); the compiles are schemas `first`, `first` + 1, ..."""
    grammars = Grammars(smollm2.tokenizer, vocab_size=smollm2.config.vocab_size, stop_ids=smollm2.eos_token_ids,
                        compile_timeout=0.02)
    grammars.warm().join()
    for n in range(COMPILE_SLOTS):
        with pytest.raises(GrammarError, match="does not compile within"):
            grammars.compile_within(_slow_schema(first + n, size=size))
    return grammars


def _slow_schema(n: int, *, size: int = 300) -> StructuredOutput:
    """A JSON schema that takes a while to compile on SmolLM2's vocabulary (optional properties are costly: 300 take
    ~0.3-0.7 s here, 500 ~1 s, 1000 ~10 s), each n its own (nothing cached)."""
    return StructuredOutput("json", json.dumps({"type": "object", "properties": {
        f"p{n}_{i}": {"type": "string"} for i in range(size)}}), param="guided_json")


@pytest.mark.slow
def test_a_compile_past_its_deadline_is_refused_and_finishes_in_its_slot(smollm2):
    """A compile not done by its deadline is a GrammarError saying so; it runs on to its end in its slot (native code
    cannot be stopped) and its grammar is cached, so the same spec asked again is at once. No thread is left
    behind: the compiles run on at most COMPILE_SLOTS threads."""
    tok = smollm2.tokenizer
    grammars = Grammars(tok, vocab_size=smollm2.config.vocab_size, stop_ids=smollm2.eos_token_ids,
                        compile_timeout=0.02)
    grammars.warm().join()

    def compile_threads() -> int:
        return sum(t.name.startswith("xgrammar-compile") for t in threading.enumerate())

    before = compile_threads()
    with pytest.raises(GrammarError, match=r"^guided_json: the JSON schema does not compile within 0.02 s: make it "):
        grammars.compile_within(_slow_schema(0))
    grammars.compile_timeout = 0.05  # ~1/15 of the compile: only a cached grammar is answered in time

    got = []

    def answered() -> bool:
        try:
            got.append(grammars.compile_within(_slow_schema(0)))
        except (GrammarError, GrammarBusy):
            return False
        return True

    wait_until(answered, timeout=60, what="the compile given up on to end, and its grammar to be cached")
    m = got[0].matcher()
    assert all(m.accept(t) for t in tok.encode('{"p0_1": "x"}', add_special_tokens=False)) and m.accept(2)
    grammars.compile_timeout = 0.02
    for n in range(1, 4):  # more than the slots: the last ones wait for one (and may be dropped unstarted)
        with pytest.raises((GrammarError, GrammarBusy)):
            grammars.compile_within(_slow_schema(n))
    assert compile_threads() - before <= COMPILE_SLOTS


@pytest.mark.slow
def test_a_compile_that_finds_every_slot_busy_past_its_deadline_is_told_to_retry(smollm2):
    """The slots all hold slow compiles (requests that gave up on them): a request queued behind them past its
    deadline is dropped unstarted, as GrammarBusy; once they end, it compiles."""
    grammars = _slots_held(smollm2, first=10)
    with pytest.raises(GrammarBusy, match=r"every structured-output compile slot \(2\) stayed busy for 0.02 s; retry"):
        grammars.compile_within(StructuredOutput("regex", "[a-z]+"))
    grammars.compile_timeout = 60
    assert grammars.compile_within(StructuredOutput("regex", "[a-z]+")) is not None


@pytest.mark.slow
def test_a_compile_that_waited_most_of_its_deadline_for_a_slot_is_told_to_retry_not_that_it_is_too_large(smollm2):
    """Both slots hold compiles until 0.7 s in; a third starts then and runs past its 1 s deadline. It was a
    GrammarError, "make it smaller or simpler" (a 400 its client cannot fix, for a compile given a fraction of its
    time); it is GrammarBusy (a 503 to retry). The compiles' times are set by hand (real compiles' vary with the
    machine's load), the classification is compile_within's own."""
    grammars = Grammars(smollm2.tokenizer, vocab_size=smollm2.config.vocab_size, stop_ids=smollm2.eos_token_ids,
                        compile_timeout=0.02)
    grammars.warm().join()
    real, gate = grammars.compile, threading.Event()

    def compile(spec: StructuredOutput) -> Any:
        if spec.spec == "held":
            gate.wait(30)
        else:
            time.sleep(1.0)  # runs past the third's deadline from wherever it starts
        return real(spec)

    grammars.compile = compile  # type: ignore[method-assign]
    for _ in range(COMPILE_SLOTS):
        with pytest.raises(GrammarError, match="does not compile within"):
            grammars.compile_within(StructuredOutput("regex", "held"))
    grammars.compile_timeout = 1.0
    threading.Timer(0.7, gate.set).start()
    with pytest.raises(GrammarBusy, match="retry"):
        grammars.compile_within(StructuredOutput("regex", "[a-z]+"))
    grammars.compile_timeout = 60
    assert grammars.compile_within(StructuredOutput("regex", "[a-z]+")) is not None


@pytest.mark.slow
def test_the_pipeline_answers_a_compile_past_its_deadline_with_a_400_and_busy_slots_with_a_503(smollm2):
    """What the HTTP layer makes of them (server/api/pipeline.py's compile_grammar)."""
    from server.api.errors import APIError
    from server.api.pipeline import compile_grammar
    from server.engine.served import ServedModel

    tok = smollm2.tokenizer
    grammars = Grammars(tok, vocab_size=smollm2.config.vocab_size, stop_ids=smollm2.eos_token_ids,
                        compile_timeout=0.02)
    served = ServedModel(name="m", num_layers=30, vocab_size=smollm2.config.vocab_size, max_model_len=8192,
                         eos_ids=smollm2.eos_token_ids, special_ids=smollm2.eos_token_ids, tokenizer=tok,
                         grammars=grammars)
    grammars.warm().join()
    answers = []
    for spec in [*(_slow_schema(20 + n) for n in range(COMPILE_SLOTS)), StructuredOutput("regex", "a+")]:
        with pytest.raises(APIError) as e:
            asyncio.run(compile_grammar(served, spec))
        answers.append((e.value.status, e.value.code, e.value.param))
    assert answers == [*[(400, "invalid_structured_output", "guided_json")] * COMPILE_SLOTS,
                       (503, "structured_outputs_busy", "structured_outputs")], answers


@pytest.mark.parametrize("warm", [False, True], ids=["on-first-use", "warmed"])
def test_without_xgrammar_a_structured_output_is_unavailable_naming_the_package(monkeypatch, warm):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import fails
    grammars = Grammars(CharTokenizer(), vocab_size=128, stop_ids=frozenset({2}))
    if warm:
        grammars.warm().join()  # the server's start: the import fails on its thread, and nothing else does
    with pytest.raises(GrammarUnavailable, match=r"need the xgrammar package.*pip install xgrammar"):
        grammars.compile(StructuredOutput("json_object"))


@pytest.mark.slow
def test_a_compile_while_warming_waits_for_it_and_compiles(smollm2):
    """The server's start warms in the background; a request that comes first waits for the compiler, then
    compiles (the compiler is the one the warming built)."""
    tok = smollm2.tokenizer
    grammars = Grammars(tok, vocab_size=smollm2.config.vocab_size, stop_ids=smollm2.eos_token_ids)
    thread = grammars.warm()
    m = grammars.matcher(StructuredOutput("choice", ("Rome",)))
    thread.join()
    assert all(m.accept(t) for t in tok.encode("Rome", add_special_tokens=False)) and m.accept(2) and m.terminated
    assert grammars.cached_bytes > 0


def test_lark_is_told_from_ebnf_as_vllm_tells_it():
    """EBNF defines a rule with '::=' on some line (comments aside); a grammar with none is Lark."""
    assert not is_lark(CITY_EBNF) and is_lark(CITY_LARK)
    assert is_lark('start: "a" // root ::= "b"') and is_lark('start: "a"  # x ::= y')
    assert not is_lark('# a comment\nroot ::= "a"')


@pytest.mark.slow
def test_compact_json_allows_no_whitespace_but_the_separators(smollm2, grammars):
    """any_whitespace=False (vLLM's disable_any_whitespace): xgrammar's separators ', ' and ': ' and nothing else
    outside strings; the default allows any."""
    tok = smollm2.tokenizer
    compact = StructuredOutput("json", json.dumps(PERSON), any_whitespace=False)
    assert _accepts(grammars, compact, '{"name": "Ada ,  Lovelace : 1", "age": 36}', tokenizer=tok)  # strings: any
    for spaced in ('{ "name": "Ada", "age": 36}', '{"name":"Ada","age":36}', '{"name": "Ada",\n "age": 36}',
                   '{"name" : "Ada", "age": 36}'):
        assert not _accepts(grammars, compact, spaced, tokenizer=tok), spaced
        assert _accepts(grammars, person(), spaced, tokenizer=tok), spaced
    assert not _accepts(grammars, StructuredOutput("json_object", any_whitespace=False), '{ }', tokenizer=tok)
    assert _accepts(grammars, StructuredOutput("json_object"), '{ }', tokenizer=tok)


def test_a_tokenizer_xgrammar_cannot_read_makes_structured_outputs_unavailable():
    grammars = Grammars(CharTokenizer(), vocab_size=128, stop_ids=frozenset({2}))
    for _ in range(2):  # found once, answered alike every time
        with pytest.raises(GrammarUnavailable, match="xgrammar cannot read its tokenizer"):
            grammars.compile(StructuredOutput("regex", "a+"))


@pytest.mark.slow
def test_the_bitmask_never_allows_tokens_past_the_tokenizer(smollm2):
    """A model's embedding padded past its tokenizer (as many are): the mask spans the model's vocabulary, and the
    padding is never allowed, not even where the grammar allows almost anything (inside a JSON string)."""
    tok = smollm2.tokenizer
    grammars = Grammars(tok, vocab_size=len(tok) + 100, stop_ids=smollm2.eos_token_ids)
    m = grammars.matcher(StructuredOutput("json_object"))
    assert all(m.accept(t) for t in tok.encode('{"a": "', add_special_tokens=False))
    allowed = unpack_bitmask(bitmask([m], len(tok) + 100), len(tok) + 100)[0]
    assert allowed.shape == (len(tok) + 100,)
    assert allowed[: len(tok)].sum() > 1000 and not allowed[len(tok):].any()
    assert not allowed[2]  # no EOS inside an open string


# -- decoding ----------------------------------------------------------------------------------------------------


def _overlapped(e: Engine) -> Engine:
    return Engine(e.model, e.tokenizer, eos_ids=e.eos_ids, config=e.config, overlap=True)


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_json_output_is_valid_against_its_schema(smollm2_engine, sampled):
    params = SamplingParams(max_tokens=60, structured=person(), **(dict(temperature=0.7, seed=1) if sampled else {}))
    for r in smollm2_engine.generate(ASKS, params=params):
        assert r.finish_reason == "stop", r.text  # the grammar's end: the model chose the EOS there
        jsonschema.validate(json.loads(r.text), PERSON)


@pytest.mark.slow
@pytest.mark.parametrize("spec,check", [
    (StructuredOutput("choice", ("Rome", "Milan", "Naples")), lambda t: t in ("Rome", "Milan", "Naples")),
    (StructuredOutput("regex", r"[A-Z][a-z]+, \d{4}"), lambda t: re.fullmatch(r"[A-Z][a-z]+, \d{4}", t)),
    (StructuredOutput("grammar", 'root ::= "The answer is " ("yes" | "no") "."'),
     lambda t: t in ("The answer is yes.", "The answer is no.")),
    (StructuredOutput("json_object"), lambda t: isinstance(json.loads(t), dict)),
], ids=["choice", "regex", "grammar", "json_object"])
def test_each_kind_constrains_greedy_and_sampled_output(smollm2_engine, spec, check):
    for params in (SamplingParams(max_tokens=60, structured=spec),
                   SamplingParams(max_tokens=60, structured=spec, temperature=1.2, seed=11)):
        r = smollm2_engine.generate([PLAIN], params=params)[0]
        assert r.finish_reason == "stop" and check(r.text), (r.text, r.finish_reason)


@pytest.mark.slow
def test_a_structural_tag_constrains_what_is_between_its_tags_and_nothing_else(smollm2, grammars):
    """vLLM's older form (structures and triggers): free text, and JSON valid against its schema between each begin
    and end that a trigger starts; the newer form's plain tag: exactly begin, JSON, end."""
    tok = smollm2.tokenizer
    city = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    legacy = StructuredOutput("structural_tag", json.dumps({"type": "structural_tag", "triggers": ["<city"],
                                                            "structures": [{"begin": "<city>", "schema": city,
                                                                            "end": "</city>"}]}))
    assert _accepts(grammars, legacy, 'Some text. <city>{"name": "Rome"}</city> More, freely.', tokenizer=tok)
    assert _accepts(grammars, legacy, "No city at all.", tokenizer=tok)
    for bad in ('<city>{"nom": "Rome"}</city>', "<city>Rome</city>", '<city>{"name": "Rome"}</town>'):
        assert not _accepts(grammars, legacy, bad, tokenizer=tok), bad
    tag = StructuredOutput("structural_tag", json.dumps({"type": "structural_tag", "format": {
        "type": "tag", "begin": "<city>", "content": {"type": "json_schema", "json_schema": city}, "end": "</city>"}}))
    assert _accepts(grammars, tag, '<city>{"name": "Rome"}</city>', tokenizer=tok)
    assert not _accepts(grammars, tag, 'Text <city>{"name": "Rome"}</city>', tokenizer=tok)


@pytest.mark.slow
def test_a_structural_tags_json_is_valid_between_its_tags(smollm2_engine):
    tag = StructuredOutput("structural_tag", json.dumps({"type": "structural_tag", "format": {
        "type": "tag", "begin": "<person>", "content": {"type": "json_schema", "json_schema": PERSON},
        "end": "</person>"}}))
    for r in smollm2_engine.generate(ASKS[:2], params=SamplingParams(max_tokens=60, structured=tag)):
        inside = re.fullmatch(r"<person>(.*)</person>", r.text, re.DOTALL)
        assert inside and r.finish_reason == "stop", (r.text, r.finish_reason)
        jsonschema.validate(json.loads(inside.group(1)), PERSON)


@pytest.mark.slow
def test_compact_json_output_is_valid_and_has_no_other_whitespace(smollm2_engine):
    for params in (SamplingParams(max_tokens=60, structured=StructuredOutput("json", json.dumps(PERSON),
                                                                              any_whitespace=False)),
                   SamplingParams(max_tokens=60, structured=StructuredOutput("json", json.dumps(PERSON),
                                                                              any_whitespace=False),
                                  temperature=0.9, seed=2)):
        for r in smollm2_engine.generate(ASKS, params=params):
            assert r.finish_reason == "stop", r.text
            value = json.loads(r.text)
            jsonschema.validate(value, PERSON)
            assert r.text == json.dumps(value, ensure_ascii=False), r.text  # Python's separators are xgrammar's


@pytest.mark.slow
def test_a_lark_grammar_decodes_as_its_ebnf_twin(smollm2_engine):
    for sampling in ({}, dict(temperature=1.0, seed=5)):
        ebnf, lark = (smollm2_engine.generate([PLAIN], params=SamplingParams(
            max_tokens=30, structured=StructuredOutput("grammar", g), **sampling))[0] for g in (CITY_EBNF, CITY_LARK))
        assert ebnf.token_ids == lark.token_ids and lark.finish_reason == "stop", (ebnf.text, lark.text)
        assert re.fullmatch(r" (Rome|Milan) is in (Italy|France)\.", lark.text), lark.text


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True], ids=["stepwise", "overlapped"])
def test_ignore_eos_decodes_on_past_the_grammars_end_unconstrained(smollm2_engine, overlap):
    """As vLLM: ignore_eos keeps a structured request going where its grammar ends (the grammar takes the EOS
    there, and past it allows every token), to max_tokens; the tokens up to the EOS are those without
    ignore_eos."""
    e = _overlapped(smollm2_engine) if overlap else smollm2_engine
    rome = StructuredOutput("choice", ("Rome",))
    ended = smollm2_engine.generate([PLAIN], params=SamplingParams(max_tokens=12, structured=rome))[0]
    assert (ended.text, ended.finish_reason) == ("Rome", "stop")
    on = e.generate([PLAIN], params=SamplingParams(max_tokens=12, structured=rome, ignore_eos=True))[0]
    n = len(ended.token_ids)
    assert on.finish_reason == "length" and len(on.token_ids) == 12, (on.text, on.finish_reason)
    assert on.token_ids[:n] == ended.token_ids and ended.token_ids[-1] in smollm2_engine.eos_ids  # to the EOS
    assert on.text.startswith("Rome") and len(on.text) > 4  # the EOS's text is skipped; free text follows


@pytest.mark.slow
def test_a_rollback_past_the_grammars_end_takes_the_matcher_back_into_it(smollm2, grammars):
    tok = smollm2.tokenizer
    m = grammars.matcher(StructuredOutput("choice", ("Rome",)))
    rome = tok.encode("Rome", add_special_tokens=False)
    assert all(m.accept(t) for t in [*rome, 2, 100, 200]) and m.terminated  # past the end: anything
    m.rollback(2)
    assert m.terminated
    m.rollback(1)  # the EOS
    assert not m.terminated and not m.accept(100) and m.accept(2) and m.terminated


@pytest.mark.slow
def test_a_fork_goes_on_from_its_matchers_place_on_its_own(smollm2, grammars):
    """A beam search's continuations: forks of one matcher take different tokens without moving it or each other,
    and one forked past the grammar's end is past it too (its rollback gives back those tokens first)."""
    tok = smollm2.tokenizer
    rome, paris = (tok.encode(c, add_special_tokens=False) for c in ("Rome", "Paris"))
    m = grammars.matcher(StructuredOutput("choice", ("Rome", "Paris")))
    a, b = m.fork(), m.fork()
    assert all(a.accept(t) for t in [*rome, 2]) and a.terminated
    assert all(b.accept(t) for t in paris) and not b.terminated and not b.accept(rome[0])
    assert not m.terminated and m.accept(rome[0]) and not m.accept(paris[0])
    assert a.accept(100)  # past its end
    late = a.fork()
    late.rollback(2)  # 100, then the EOS
    assert not late.terminated and a.terminated and late.accept(2)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True], ids=["stepwise", "overlapped"])
def test_structured_rows_beside_free_rows_leave_them_as_alone(smollm2_engine, overlap):
    """A batch of free rows and structured rows, the structured ones joining mid-way: each free row's tokens are
    its own alone, each structured row's those of decoding it alone, overlapped or not."""
    e = _overlapped(smollm2_engine) if overlap else smollm2_engine
    free = SamplingParams(max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, seed=3)
    jobs = [(PLAIN, free), (ASK, SamplingParams(max_tokens=60, structured=person())), ("Once upon a time", sampled),
            (PLAIN, SamplingParams(max_tokens=20, structured=StructuredOutput("choice", ("Rome", "Milan")),
                                   temperature=1.0, seed=9))]
    alone = [smollm2_engine.generate([p], params=sp)[0].token_ids for p, sp in jobs]
    seqs = [e.new_sequence(p, sp, e.compile("full")) for p, sp in jobs]
    batch = e.new_batch(max_len=256, num_blocks=256)
    batch.add(seqs[:1])
    batch.step()
    batch.add(seqs[1:])  # joining a step in flight (overlapped)
    while batch.sequences:
        batch.step()
        batch.filter()
    assert [s.output_ids for s in seqs] == alone
    assert [s.finish_reason for s in seqs] == ["length", "stop", "length", "stop"]
    jsonschema.validate(json.loads(seqs[1].text), PERSON)


def _unread_at_launch(monkeypatch) -> list[int]:
    """For each step queued (`Batch.launch`), how many steps queued before it were not read yet."""
    counts: list[int] = []
    unread: set[int] = set()
    launch, result = Batch.launch, Launched.result

    def launch_(batch: Batch, inp):
        counts.append(len(unread))
        launched = launch(batch, inp)
        unread.add(id(launched))
        return launched

    def result_(launched: Launched):
        unread.discard(id(launched))
        return result(launched)

    monkeypatch.setattr(Batch, "launch", launch_)
    monkeypatch.setattr(Launched, "result", result_)
    return counts


@pytest.mark.slow
def test_overlapped_decoding_reads_each_step_before_a_structured_row_needs_its_mask(smollm2_engine, monkeypatch):
    """Overlapped, a free row's steps are queued while the last is unread; once a structured row runs, every step is
    read before the next decode step is queued (its mask needs the token), and when it ends the steps overlap
    again. The tokens are those of decoding each alone."""
    e = _overlapped(smollm2_engine)
    free = e.new_sequence(PLAIN, SamplingParams(max_tokens=30, ignore_eos=True), e.compile("full"))
    city = " Rome, the eternal city of Italy."
    choice = e.new_sequence(PLAIN, SamplingParams(max_tokens=20, structured=StructuredOutput("choice", (city,))),
                            e.compile("full"))
    batch = e.new_batch(max_len=256, num_blocks=256)
    unread = _unread_at_launch(monkeypatch)
    batch.add([free])
    batch.step()
    batch.step()
    assert unread == [0, 1, 1]  # the prefill, then each decode step queued while the last is in flight
    del unread[:]
    batch.add([choice])  # its prefill is queued while the free row's step is in flight: it needs no token yet
    while not choice.finished:
        batch.step()
    batch.filter()
    assert unread[0] == 1 and len(unread) > 2 and set(unread[1:]) == {0}, unread
    del unread[:]
    batch.step()
    batch.step()
    assert unread == [0, 1]  # overlapped again
    while batch.sequences:
        batch.step()
        batch.filter()
    assert free.output_ids == smollm2_engine.generate([PLAIN], params=free.params)[0].token_ids
    assert choice.text == city and choice.finish_reason == "stop"


@pytest.mark.slow
def test_min_tokens_past_a_complete_grammar_fails_that_row_saying_so(smollm2_engine):
    """The grammar ends after "Rome" (its only continuation is the EOS, which min_tokens forbids): that row fails
    naming min_tokens; its structured neighbour is unaffected."""
    e = smollm2_engine
    rome = StructuredOutput("choice", ("Rome",))
    [failed] = e.generate([PLAIN], params=SamplingParams(max_tokens=10, structured=rome, min_tokens=5))
    assert failed.finish_reason == "error" and "before min_tokens (5)" in failed.error, failed.error
    seqs = [e.new_sequence(PLAIN, SamplingParams(max_tokens=10, structured=rome, min_tokens=m), e.compile("full"))
            for m in (5, 0)]
    batch = e.new_batch(max_len=128, num_blocks=128)
    batch.add(seqs)
    while batch.sequences:
        batch.step()
        batch.filter()
    assert seqs[0].finish_reason == "error" and (seqs[1].text, seqs[1].finish_reason) == ("Rome", "stop")


@pytest.mark.slow
def test_a_rollback_takes_the_matcher_back_with_the_tokens(smollm2_engine):
    """Tokens a verifier rejects leave the grammar too: decoding on after a rollback gives the same JSON."""
    e = smollm2_engine
    want = e.generate([ASK], params=SamplingParams(max_tokens=60, structured=person()))[0]
    s = e.new_sequence(ASK, SamplingParams(max_tokens=60, structured=person()), e.compile("full"))
    batch = e.new_batch(max_len=256, num_blocks=256)
    batch.add([s])
    for _ in range(8):
        batch.step()
    batch.rollback(s, 3)
    while batch.sequences:
        batch.step()
        batch.filter()
    assert (s.output_ids, s.text) == (want.token_ids, want.text)


def test_a_batch_without_structured_rows_does_no_grammar_work(tiny_engine, monkeypatch):
    """No bitmask, no mask tensor: the path of a batch before structured outputs existed."""
    from server.engine import generate

    def no_bitmask(*args, **kwargs):
        raise AssertionError("a batch without structured rows built a bitmask")

    monkeypatch.setattr(generate, "bitmask", no_bitmask)
    batches = []
    of = generate.SamplingBatch.of
    monkeypatch.setattr(generate.SamplingBatch, "of", lambda *a, **k: batches.append(of(*a, **k)) or batches[-1])
    tiny_engine.generate([[5, 6, 7], [8]], params=SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True))
    assert batches and all(b.grammar is None and b.grammar_rows is None for b in batches)
