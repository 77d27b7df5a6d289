"""The `painters` command's own rules (its subcommands' work has its own tests): what `serve --replicas` asks Ray
for, and the options it refuses before starting anything."""

from __future__ import annotations

from typer.testing import CliRunner

from server.cli import app, default_gpus_per_replica


def test_replicas_share_this_machines_gpus_at_most_one_each():
    """One GPU each whatever the count left a second replica on a one-GPU machine waiting for a GPU until the
    start-up timed out (600 s), with no word of why."""
    assert default_gpus_per_replica(None, replicas=2, gpus=1) == 0.5
    assert default_gpus_per_replica("cuda", replicas=2, gpus=4) == 1.0
    assert default_gpus_per_replica("cuda", replicas=3, gpus=2) == 2 / 3
    assert default_gpus_per_replica("cpu", replicas=2, gpus=4) == 0.0
    assert default_gpus_per_replica(None, replicas=2, gpus=0) == 0.0


def test_serve_refuses_what_cannot_work_before_starting_anything():
    cuda1 = CliRunner().invoke(app, ["serve", "--replicas", "2", "--device", "cuda:1"])
    assert cuda1.exit_code == 2 and "use --device cuda" in cuda1.output
    alone = CliRunner().invoke(app, ["serve", "--gpus-per-replica", "0.5"])
    assert alone.exit_code == 2 and "need --replicas" in alone.output


def test_serve_flags_reach_the_settings_and_a_bad_value_is_refused(monkeypatch):
    """The scheduling and prefill flags become the app's settings (nothing is loaded: create_app is stubbed), and a
    policy the scheduler does not know is refused naming the ones it does."""
    import server.app

    seen = {}
    monkeypatch.setattr(server.app, "create_app", lambda settings: seen.setdefault("settings", settings))
    monkeypatch.setattr(server.app, "serve", lambda app_, **kw: 0)
    r = CliRunner().invoke(app, ["serve", "--scheduling-policy", "priority", "--chunked-prefill-size", "64",
                                 "--enable-prompt-tokens-details"])
    assert r.exit_code == 0, r.output
    s = seen["settings"]
    assert (s.scheduling_policy, s.chunked_prefill_size, s.enable_prompt_tokens_details) == ("priority", 64, True)
    bad = CliRunner().invoke(app, ["serve", "--scheduling-policy", "lottery"])
    assert bad.exit_code != 0 and "fcfs" in bad.output and "priority" in bad.output


def test_the_speculative_config_flag_is_vllms_json_and_a_bad_one_is_refused(monkeypatch):
    """--speculative-config as vLLM's (and a Ray Serve argument's) JSON text; a bad one refused naming what is
    wrong: not JSON, an unknown method, too many tokens, a missing draft policy, an unknown key."""
    import server.app
    from server.settings import SpeculativeConfig

    seen = {}
    monkeypatch.setattr(server.app, "create_app", lambda settings: seen.setdefault("settings", settings))
    monkeypatch.setattr(server.app, "serve", lambda app_, **kw: 0)
    r = CliRunner().invoke(app, ["serve", "--speculative-config",
                                 '{"method": "layer_skip", "draft_policy": "skip:8", "num_speculative_tokens": 3}'])
    assert r.exit_code == 0, r.output
    config = seen["settings"].speculative_config
    assert (config.method, config.draft_policy, config.num_speculative_tokens) == ("layer_skip", "skip:8", 3)
    # vLLM's configs that give one lookup bound: the other follows it
    for given, bounds in [({"prompt_lookup_max": 1}, (1, 1)), ({"prompt_lookup_min": 5}, (5, 5)), ({}, (2, 4))]:
        config = SpeculativeConfig(method="ngram", num_speculative_tokens=3, **given)
        assert (config.prompt_lookup_min, config.prompt_lookup_max) == bounds, given
    for flag, says in [('{"method": "ngram"', "not JSON"),
                       ('{"method": "eagle", "num_speculative_tokens": 3}', "layer_skip"),
                       ('{"method": "ngram", "num_speculative_tokens": 99}', "less than or equal to 16"),
                       ('{"method": "layer_skip", "num_speculative_tokens": 3}', "needs a draft_policy"),
                       ('{"method": "ngram", "num_speculative_tokens": 3, "n": 1}', "Extra inputs"),
                       ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 5, '
                        '"prompt_lookup_max": 2}', "is above prompt_lookup_max")]:
        bad = CliRunner().invoke(app, ["serve", "--speculative-config", flag])
        assert bad.exit_code != 0 and says in " ".join(bad.output.split()), (flag, bad.output)
