"""The playground in a real browser: Debian's chromium, headless, driven by Playwright against a real uvicorn
process serving the embedded SmolLM2-135M with an API key and a preset file in `painters search`'s format. The page asks for the
key; then `full`, `skip:10` and a preset stream side by side at temperature 0 and each column's text must equal the
API's answer to the same request, the divergence marker must sit on the first character where skip:10's text leaves
full's, and a bad policy must show its 400 in its column. Takes a desktop and a phone-width screenshot: into a
temporary folder, or into $PAINTERS_SCREENSHOTS (`make screenshots` points it at docs/, whose playground.png the README
shows), so a test run never rewrites tracked files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import ROOT, Process, painters_server

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
KEY = "playground-test-key"
# A preset file as `painters search` writes one (its committed result may hold no searched preset at all).
PRESETS_YAML = """\
# painters search: the fastest policy keeping >= 0.9 of smollm2-135m's normalised score
# arc_easy-90: sleb, skip 16-20, speed-up 1.24x; selection bound 0.812; held-out mean 0.905 \u00b1 0.040, vs `skip:12-16` (1.22x) +0.010 \u00b1 0.030
arc_easy-90: "skip:16-20"
"""
PROMPT = "The capital of France is Paris. The capital of Germany is"
MAX_TOKENS = 24
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def system_chromium() -> str | None:
    """A browser Playwright can drive (it cannot download its own here): $PAINTERS_CHROMIUM or one on PATH."""
    named = os.environ.get("PAINTERS_CHROMIUM")
    if named:
        return named
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e "
                                   "'.[browser]' (make test does)")
    executable = system_chromium()
    if executable is None:
        pytest.skip("no chromium to drive: apt-get install chromium (.ci/run does), or set PAINTERS_CHROMIUM")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    work = Path(tmp_path_factory.mktemp("playground"))
    presets = work / "presets.yaml"
    presets.write_text(PRESETS_YAML)
    extra = ("--api-key", KEY, "--policy-presets", str(presets))
    with painters_server(work, extra=extra) as p:
        yield p


def api_text(server: Process, policy: str) -> str:
    r = httpx.post(f"{server.url}/v1/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=120,
                   json={"model": MODEL, "prompt": PROMPT, "policy": policy, "max_tokens": MAX_TOKENS,
                         "temperature": 0, "seed": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def first_difference(a: str, b: str) -> int:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


def set_policies(page, policies: list[str]) -> None:
    """Make the page's columns exactly `policies` (typed into each column's box, as a person would)."""
    while page.locator(".column").count() > len(policies):
        page.locator(".column .remove").last.click()
    while page.locator(".column").count() < len(policies):
        page.click("#add-column")
    for i, policy in enumerate(policies):
        box = page.locator(".column .policy").nth(i)
        box.fill(policy)
        box.press("Enter")


def run_and_wait(page, n: int) -> None:
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")  # keyboard operable: the whole run from the prompt box
    page.wait_for_function(
        "n => [...document.querySelectorAll('.column')].filter(c => ['done', 'error'].includes(c.dataset.state))"
        ".length === n && document.querySelector('#run').disabled === false", arg=n, timeout=120_000)


def column(page, i: int):
    return page.locator(".column").nth(i)


def test_playground_streams_policies_side_by_side(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # The page is public; its API calls are not: it asks for the key once and keeps it in the tab.
    assert httpx.get(f"{server.url}/playground").status_code == 200
    assert httpx.get(f"{server.url}/v1/playground").status_code == 401
    page.goto(f"{server.url}/playground")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
    assert page.evaluate("sessionStorage.getItem('painters-api-key')") == KEY
    # the snippets carry the key header, after a reload too (the key comes back from the tab, with no 401 to say
    # that one is needed: the copied curl was refused)
    auth = 'authorization: Bearer $PAINTERS_API_KEY'
    snippet = "document.querySelector('.column .curl').textContent.length > 0"  # written once the column is set up
    page.wait_for_function(snippet, timeout=60_000)
    assert auth in column(page, 0).locator(".curl").text_content()
    page.reload()
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
    page.wait_for_function(snippet, timeout=60_000)
    assert auth in column(page, 0).locator(".curl").text_content()
    assert 'os.environ["PAINTERS_API_KEY"]' in column(page, 0).locator(".python").text_content()
    assert page.locator("#key-button").is_visible()

    page.fill("#prompt", PROMPT)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#seed", "0")
    policies = ["full", "skip:10", "arc_easy-90", "loop:8-22x3"]
    set_policies(page, policies)
    page.wait_for_function("[...document.querySelectorAll('.column')].every(c => c.dataset.policy)")
    run_and_wait(page, len(policies))

    texts = [column(page, i).locator(".output").get_attribute("data-text") for i in range(len(policies))]
    for policy, text in zip(policies, texts):
        assert text == api_text(server, policy), f"{policy}: the page's stream differs from the API's answer"
        assert text
    # every column shows the server's timings once done, and a speed-up against full
    for i in range(len(policies)):
        assert "server timings" in column(page, i).locator(".timing-source").inner_text()
        assert column(page, i).locator(".ttft").inner_text().endswith("ms")
    assert column(page, 0).locator(".speedup").inner_text() == "baseline"
    assert column(page, 1).locator(".speedup").inner_text().endswith("×")

    # the divergence marker sits on the token holding the first character where skip:10 leaves full
    full, skipped = texts[0], texts[1]
    at = first_difference(full, skipped)
    assert at < max(len(full), len(skipped)), "full and skip:10 agree on this prompt: pick another"
    skip_col = column(page, 1)
    assert skip_col.get_attribute("data-diverge-char") == str(at)
    marked = skip_col.locator(".tok.diverge")
    assert marked.count() == 1
    offset = int(marked.get_attribute("data-offset"))
    assert offset <= at < offset + len(marked.evaluate("e => e.textContent"))
    token = marked.get_attribute("data-token")
    assert f"departs from full at token {token}" in skip_col.locator(".divergence").inner_text()
    assert column(page, 0).locator(".tok.diverge").count() == 0

    # the strips are the server's schedules: skip:10 greys 10-19, the loop counts x3, the preset resolves
    assert skip_col.locator(".cell.skipped").inner_text() == "10–19"
    assert column(page, 3).locator(".loop .times").inner_text() == "×3"
    assert "score 0.905" in column(page, 2).locator(".preset-note").inner_text()
    # the heatmap drew the probe of this prompt
    page.wait_for_function("document.querySelector('#heatmap-caption').textContent.includes('tokens')")

    shots = Path(os.environ.get("PAINTERS_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    column(page, 1).locator(".heat").check()
    page.screenshot(path=str(shots / "playground.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(shots / "playground-phone.png"), full_page=False)
    assert all((shots / name).stat().st_size > 10_000 for name in ("playground.png", "playground-phone.png"))
    page.set_viewport_size({"width": 1280, "height": 800})

    # the Run button sends what the server accepts: a temperature off the 0.1 grid, max tokens past 512 (the form
    # refused both with a tooltip, while Ctrl+Enter sent them)
    set_policies(page, ["full"])
    page.fill("#temperature", "0.75")
    page.fill("#max-tokens", "513")
    assert page.evaluate("document.querySelector('#run-form').checkValidity()")
    with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
        page.click("#run")
    assert '"temperature":0.75' in sent.value.post_data and '"max_tokens":513' in sent.value.post_data
    page.wait_for_function("['done', 'error'].includes(document.querySelector('.column').dataset.state) && "
                           "document.querySelector('#run').disabled === false", timeout=120_000)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(MAX_TOKENS))

    # a bad policy: its column shows the server's 400, the others still run (this time all at once)
    page.uncheck("#one-at-a-time")
    set_policies(page, ["full", "skip:99"])
    run_and_wait(page, 2)
    bad = column(page, 1)
    assert bad.get_attribute("data-state") == "error"
    message = bad.locator(".run-error").inner_text()
    assert message.startswith("400:") and "skip:99" in message and "allowed forms" in message
    assert column(page, 0).get_attribute("data-state") == "done"
    assert "together with 1 more" in column(page, 0).locator(".timing-source").inner_text()
    assert column(page, 0).locator(".output").get_attribute("data-text") == full
    assert not errors, errors
