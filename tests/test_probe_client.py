"""`painters probe`: combining batches (hand-made responses, then the real endpoint: batches equal one request),
what looks removable, the heatmap and tables, and the command against a tiny model with a layer that adds nothing."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from clients.client import PaintersClient
from clients.probe import (
    Probe,
    batches,
    blocks_table,
    combine,
    influence_table,
    probe_command,
    probe_text,
    run_probe,
    write_outputs,
)
from clients.tasks import Cloze, MultipleChoice
from clients.types import ProbeResponse
from tests.conftest import tiny_llama_with_identity_layer
from tests.serving import serve_tiny

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IDENTITY = 3  # the tiny model's layer that adds nothing
TEXTS = ["the cat sat on the mat", "hello world", "painters at work on a wall", "abc", "one two three four five",
         "a longer sentence so that the batches differ in tokens"]


def response(seqs: int, tokens: int, value: float, steps: int = 4) -> ProbeResponse:
    """A fake batch whose every statistic equals `value`."""
    return ProbeResponse(model="m", policy="full", schedule="schedule:0-3", steps=[str(i) for i in range(steps)],
                         num_sequences=seqs, num_tokens=tokens,
                         similarity=[[value] * (steps + 1) for _ in range(steps + 1)],
                         block_influence=[value] * steps,
                         angular_distance=[[value] * (steps + 1 - n) for n in range(1, steps // 2 + 1)])


def test_combine_weighs_by_sequences_and_tokens():
    a, b = response(seqs=1, tokens=30, value=0.0), response(seqs=3, tokens=10, value=1.0)
    p = combine([a, b])
    assert p.num_sequences == 4 and p.num_tokens == 40
    assert np.allclose(p.similarity, 0.75)  # 3 of 4 sequences say 1
    assert all(np.allclose(row, 0.75) for row in p.angular_distance)
    assert np.allclose(p.block_influence, 0.25)  # 10 of 40 tokens say 1
    assert combine([a]).similarity.tolist() == a.similarity
    with pytest.raises(ValueError, match="different schedules"):
        combine([a, response(1, 1, 0.0, steps=6)])
    with pytest.raises(ValueError, match="no probe responses"):
        combine([])


def hand_made_probe() -> Probe:
    S = 6
    bi = np.array([0.5, 0.2, 0.05, 0.01, 0.3, 0.6])
    distance = [np.array([0.4, 0.3, 0.1, 0.02, 0.2, 0.5]), np.array([0.5, 0.35, 0.12, 0.3, 0.55]),
                np.array([0.6, 0.4, 0.3, 0.5])]  # row n - 1: d(i, i + n) for i = 0 .. S - n
    return Probe(model="m", policy="full", schedule="schedule:0-5", steps=[str(i) for i in range(S)],
                 num_sequences=2, num_tokens=10, similarity=np.eye(S + 1), block_influence=bi,
                 angular_distance=distance)


def test_what_looks_removable():
    p = hand_made_probe()
    assert p.least_influential(3) == [3, 2, 1]
    blocks = p.most_alike_blocks()
    assert [(b.n, b.start, b.label) for b in blocks] == [(1, 3, "3"), (2, 2, "2-3"), (3, 2, "2-4")]
    assert blocks[1].distance == pytest.approx(0.12) and list(blocks[2].steps) == [2, 3, 4]
    js = p.to_json()
    assert js["removable"]["steps_by_block_influence"][0] == {"step": "3", "index": 3, "block_influence": 0.01}
    assert js["removable"]["blocks_by_angular_distance"][1]["steps"] == "2-3"
    assert Probe.from_json(js).block_influence.tolist() == p.block_influence.tolist()


def test_heatmap_tables_and_json(tmp_path):
    p = hand_made_probe()
    paths = write_outputs(p, tmp_path / "out", settings={"task": "piqa"})
    assert [x.name for x in paths] == ["probe.json", "similarity.png", "removable.png"]
    for png in paths[1:]:
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000
    js = json.loads(paths[0].read_text())
    assert js["task"] == "piqa" and len(js["similarity"]) == 7
    influence = influence_table(p, 2).plain().splitlines()
    assert influence[3].split() == ["1", "3", "0.0100"] and influence[4].split() == ["2", "2", "0.0500"]
    rows = blocks_table(p).plain().splitlines()[3:]
    assert [r.split() for r in rows] == [["1", "3", "0.0200"], ["2", "2-3", "0.1200"], ["3", "2-4", "0.3000"]]


def test_texts_and_batches():
    mc = MultipleChoice(contexts=("Q?",) * 2, continuations=(" no", " yes"), gold=1, choice_lengths=(2, 3))
    assert probe_text(mc) == "Q? yes"
    assert probe_text(Cloze(context="a b", continuation=" c")) == "a b c"
    assert batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


# -- against the real endpoint ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url():
    with serve_tiny(model_factory=lambda: tiny_llama_with_identity_layer(IDENTITY)) as u:
        yield u


def test_a_long_text_is_cut_to_its_start(url, monkeypatch):
    """Cut to its last tokens, a long text lost the tokenizer's BOS (Gemma's attention sink) and began mid-sentence;
    its first tokens are probed, as the model always sees a text."""
    import clients.probe as probe

    sent: list[list[int]] = []
    real = probe._probe_batch

    async def spy(client, prompts, policy):
        sent.extend(prompts)
        return await real(client, prompts, policy)

    monkeypatch.setattr(probe, "_probe_batch", spy)
    asyncio.run(run_probe(url, ["abcdefghij"], max_length=4))
    with PaintersClient(url) as client:
        assert sent == [client.tokenize("abcdefghij")[:4]]


def test_batches_combined_equal_one_request(url):
    whole = asyncio.run(run_probe(url, TEXTS, batch_size=len(TEXTS)))
    pieces = asyncio.run(run_probe(url, TEXTS, batch_size=2))
    assert whole.num_sequences == pieces.num_sequences == len(TEXTS)
    assert whole.num_tokens == pieces.num_tokens == sum(len(t) for t in TEXTS)  # one token per byte
    np.testing.assert_allclose(pieces.similarity, whole.similarity, atol=1e-5)
    np.testing.assert_allclose(pieces.block_influence, whole.block_influence, atol=1e-5)
    for a, b in zip(pieces.angular_distance, whole.angular_distance):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_identity_layer_is_found(url):
    with PaintersClient(url) as client:
        r = client.probe(TEXTS[:2])
    assert isinstance(r, ProbeResponse) and r.steps == ["0", "1", "2", "3", "4", "5"]
    p = Probe.of(r)
    assert p.least_influential(1) == [IDENTITY]
    assert p.block_influence[IDENTITY] == pytest.approx(0.0, abs=1e-6)
    assert p.similarity[IDENTITY, IDENTITY + 1] == pytest.approx(1.0, abs=1e-6)
    # its input and output are the same vector: the angle between them is 0, not arccos's rounding (~1e-4)
    assert r.angular_distance[0][IDENTITY] < 1e-6
    assert p.most_alike_blocks()[0].label == str(IDENTITY)


def test_a_batch_over_the_token_bound_is_split():
    texts = ["x" * 40] * 4
    with serve_tiny(probe_max_tokens=100) as small:  # two texts per request at most
        split = asyncio.run(run_probe(small, texts, batch_size=4))
    assert split.num_sequences == 4 and split.num_tokens == 160


def test_probe_command(url, tmp_path):
    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps({"goal": f"How to do thing {i}?", "sol1": "Slowly.", "sol2": "Quickly.",
                                        "label": i % 2}) + "\n" for i in range(5)))
    app = typer.Typer()
    app.command("probe")(probe_command)
    app.command("other")(lambda: None)
    out = tmp_path / "out"
    args = ["probe", "--url", url, "--task", "piqa", "--data", str(data), "--limit", "4", "--out", str(out),
            "--batch-size", "3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / "similarity.png").read_bytes().startswith(PNG_MAGIC)
    js = json.loads((out / "probe.json").read_text())
    assert js["num_sequences"] == 4 and js["policy"] == "full" and js["task"] == "piqa"
    lines = r.stdout.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("rank"))) + 2
    assert lines[first].split()[:2] == ["1", str(IDENTITY)]  # the layer that adds nothing ranks first
    as_json = CliRunner().invoke(app, [*args, "--json", "--policy", "skip:1-1"])
    assert as_json.exit_code == 0, as_json.output
    skipped = json.loads(as_json.stdout)
    assert skipped["policy"] == "skip:1-1" and skipped["steps"] == ["0", "2", "3", "4", "5"]
    bad = CliRunner().invoke(app, [*args, "--policy", "bogus"])
    assert bad.exit_code == 2 and "bogus" in bad.stderr
