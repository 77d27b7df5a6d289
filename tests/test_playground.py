"""The playground's Python side: the schedule -> layer strip description (pure, every policy kind), the preset notes
read from a `painters search` file, and the page, its files and its two endpoints on the tiny model (TestClient),
with API keys on and off."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.api.playground import STATIC, preset_notes
from server.policy.compiler import compile_schedule
from server.policy.layer_strip import Block, Cell, strip
from tests.serving import MODEL, serving, settings

L = 30  # SmolLM2's layers


def blocks(policy: str, n: int = L) -> list[tuple[int, list[tuple[str, int, int]]]]:
    """(times, [(kind, first layer, last layer)]) per block: a compact view to compare against."""
    return [(b.times, [(c.kind, c.layers[0], c.layers[-1]) for c in b.cells]) for b in strip(compile_schedule(policy, n)).blocks]


def test_full_is_one_run_and_changes_nothing():
    s = strip(compile_schedule("full", L))
    assert s.blocks == (Block((Cell("run", tuple(range(L))),)),)
    assert s.changed == () and s.skipped == () and s.runs == (1,) * L and s.layer_runs == L
    assert s.policy == "full" and s.schedule == compile_schedule("full", L).key


def test_skip_greys_the_skipped_layers_where_they_would_run():
    assert blocks("skip:10") == [(1, [("run", 0, 9)]), (1, [("skipped", 10, 19)]), (1, [("run", 20, 29)])]
    s = strip(compile_schedule("skip:10", L))
    assert s.skipped == s.changed == tuple(range(10, 20)) and s.layer_runs == 20


def test_a_set_of_skipped_layers_is_several_grey_runs():
    assert blocks("skip:3,5,9-11") == [(1, [("run", 0, 2)]), (1, [("skipped", 3, 3)]), (1, [("run", 4, 4)]),
                                       (1, [("skipped", 5, 5)]), (1, [("run", 6, 8)]), (1, [("skipped", 9, 11)]),
                                       (1, [("run", 12, 29)])]


def test_pairs_are_groups_drawn_together_with_their_rule():
    s = strip(compile_schedule("pairs:4-9", L))
    groups = [c for b in s.blocks for c in b.cells if c.kind == "group"]
    assert [(g.layers, g.combine) for g in groups] == [((4, 5), "pairs"), ((6, 7), "pairs"), ((8, 9), "pairs")]
    assert s.changed == tuple(range(4, 10)) and s.skipped == ()


def test_a_loop_is_one_counted_group():
    assert blocks("loop:8-22x3") == [(1, [("run", 0, 7)]), (3, [("group", 8, 22)]), (1, [("run", 23, 29)])]
    s = strip(compile_schedule("loop:8-22x3", L))
    assert s.runs[8:23] == (3,) * 15 and s.layer_runs == 15 + 3 * 15


def test_repeat_counts_the_centre_layer_and_greys_the_others():
    assert blocks("repeat:8-22") == [(1, [("run", 0, 7)]), (1, [("skipped", 8, 14)]), (15, [("run", 15, 15)]),
                                     (1, [("skipped", 16, 22)]), (1, [("run", 23, 29)])]


def test_a_repeated_block_of_several_steps_folds_into_one_count():
    assert blocks("schedule:0-14,15,16,15,16,17-29") == [
        (1, [("run", 0, 14)]), (2, [("run", 15, 15), ("run", 16, 16)]), (1, [("run", 17, 29)])]


def test_reverse_marks_moved_layers_but_not_the_layers_around_the_range():
    s = strip(compile_schedule("reverse:8-22", L))
    cells = [c for b in s.blocks for c in b.cells]
    assert [c.layers for c in cells] == [tuple(range(8)), *[(i,) for i in range(22, 7, -1)], tuple(range(23, 30))]
    assert [c.moved for c in cells] == [False] + [True] * 15 + [False]
    assert s.changed == tuple(range(8, 23))


def test_shuffle_changes_only_layers_inside_its_range():
    s = strip(compile_schedule("shuffle:8-22:3", L))
    assert set(s.changed) <= set(range(8, 23)) and len(s.changed) >= 10
    assert sorted(i for b in s.blocks for c in b.cells for i in c.layers) == list(range(L))


@pytest.mark.parametrize("policy", ["full", "skip:10", "pairs", "parallel", "loop:x3", "reverse", "shuffle:4-25:9",
                                    "repeat", "schedule:0-9,10+11/pairs,12+13+14/mean,15,15,16-29", "skip:0,29"])
def test_the_strip_runs_every_step_of_the_schedule_in_order(policy):
    """Unfolded, the strip's runs and groups are exactly the schedule's steps; skipped cells are the unrun layers."""
    schedule = compile_schedule(policy, L)
    s = strip(schedule)
    steps, grey = [], []
    for b in s.blocks:
        for _ in range(b.times):
            for c in b.cells:
                if c.kind == "group":
                    steps.append(c.layers)
                elif c.kind == "run":
                    steps += [(i,) for i in c.layers]
                else:
                    grey += c.layers
    assert steps == [st.layers for st in schedule.steps]
    assert sorted(set(grey)) == list(s.skipped) and len(grey) == len(s.skipped)


# -- preset notes --------------------------------------------------------------------------------------------------

SEARCH_FILE = """\
# painters search: the fastest policies keeping >= 0.9 of smollm2-135m's normalised score on arc_easy
# score = normalised score on the search items (0 = random, 1 = full); speed-up = full TPOT p50 / this
# arc_easy-90: SLEB, skip 5 layers, score 0.905, speed-up 1.24x (TPOT p50 53.2 ms)
arc_easy-90: "skip:16-20"
# arc_easy-90-pairs: parallel pairs, score 1.000, speed-up -x (TPOT p50 - ms)
arc_easy-90-pairs: "pairs:9-12"
handmade: "skip:3"
"""


def test_preset_notes_read_the_measured_score_and_speed_up():
    notes = preset_notes(SEARCH_FILE, ["arc_easy-90", "arc_easy-90-pairs", "handmade"])
    assert set(notes) == {"arc_easy-90", "arc_easy-90-pairs"}  # the header lines name no preset
    assert (notes["arc_easy-90"].score, notes["arc_easy-90"].speedup) == (0.905, 1.24)
    assert notes["arc_easy-90"].note.startswith("SLEB, skip 5 layers")
    assert (notes["arc_easy-90-pairs"].score, notes["arc_easy-90-pairs"].speedup) == (1.0, None)


def test_the_committed_search_result_has_notes_for_every_searched_preset():
    text = (Path(__file__).resolve().parent.parent / "docs/results/search/presets.yaml").read_text()
    import yaml

    presets = yaml.safe_load(text)
    notes = preset_notes(text, list(presets))
    # a preset of `full` (the search found nothing that held up) carries no figures; every other one does
    searched = {name for name, policy in presets.items() if policy != "full"}
    assert searched <= set(notes) and all(notes[n].score is not None and notes[n].speedup for n in searched)


def test_notes_in_the_current_search_wording():
    line = ("# arc-80: sleb, skip 18-20, speed-up 1.21x; selection bound 0.812; held-out mean 0.934 \u00b1 0.051, "
            "vs `skip:13-15` (1.19x) +0.021 \u00b1 0.040")
    notes = preset_notes(line, ["arc-80"])
    assert notes["arc-80"].score == pytest.approx(0.934) and notes["arc-80"].speedup == pytest.approx(1.21)


# -- the endpoints on the tiny model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def presets_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "presets.yaml"
    path.write_text("# fast: handmade, score 0.75, speed-up 1.50x\nfast: \"skip:2\"\nplain: pairs\n")
    return path


def test_the_page_and_its_files_are_served_from_the_package(presets_file):
    with serving(settings()) as c:
        r = c.get("/playground")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "/playground/static/app.js" in r.text and "cdn" not in r.text.lower()
        for f in STATIC.iterdir():
            got = c.get(f"/playground/static/{f.name}")
            assert got.status_code == 200 and got.content == f.read_bytes()
        assert c.get("/playground/static/nope.js").status_code == 404


def test_schedule_endpoint_resolves_like_a_completion(presets_file):
    with serving(settings(policy_presets=presets_file)) as c:
        r = c.post("/v1/schedule", json={"policy": "skip:2"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["policy"] == "skip:2-3" and body["skipped"] == [2, 3] and body["num_layers"] == 6
        assert body["blocks"][1] == {"cells": [{"kind": "skipped", "layers": [2, 3], "combine": None,
                                                "moved": False}], "times": 1}
        # the schedule key is the one every completion reports in its `painters` object
        done = c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "policy": "skip:2"}).json()
        assert done["painters"]["schedule"] == body["schedule"]
        assert c.post("/v1/schedule", json={"model": f"{MODEL}@fast"}).json()["policy"] == "skip:2-3"
        bad = c.post("/v1/schedule", json={"policy": "skip:99"})
        assert bad.status_code == 400 and "allowed forms" in bad.json()["error"]["message"]
        assert c.post("/v1/schedule", json={"model": "other"}).status_code == 404


def test_playground_info_lists_presets_with_their_measured_figures(presets_file):
    with serving(settings(policy_presets=presets_file)) as c:
        info = c.get("/v1/playground").json()
        assert info["model"] == MODEL and info["num_layers"] == 6 and info["default_policy"] == "full"
        by_name = {p["name"]: p for p in info["presets"]}
        assert by_name["fast"]["policy"] == "skip:2-3"
        assert (by_name["fast"]["score"], by_name["fast"]["speedup"]) == (0.75, 1.5)
        assert by_name["plain"]["score"] is None and by_name["plain"]["policy"] == "pairs:1-4"


def test_with_api_keys_the_page_is_public_and_the_api_is_not():
    with serving(settings(api_key="sekret")) as c:
        assert c.get("/playground").status_code == 200
        assert c.get("/playground/static/app.js").status_code == 200
        assert c.get("/v1/playground").status_code == 401
        assert c.post("/v1/schedule", json={"policy": "full"}).status_code == 401
        ok = c.post("/v1/schedule", json={"policy": "full"}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200


def test_the_strip_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, server.policy.layer_strip; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
