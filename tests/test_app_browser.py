"""The web app in a real browser: Playwright drives Debian's chromium against `python app.py` on localhost.

    python -m pytest -q tests/test_app_browser.py        # .ci/run installs chromium with apt

It checks that the first screen opens on the recommended preset (the CPU demo: no CUDA here), then follows the
Setup flow from a workspace holding only a model folder (the model's check beside it, the bundled sample data
previewed as the model sees it, tiny sizes under Advanced, a bad setting's error next to the button, the time
estimate), starts the run, waits for it to finish, and checks that the plots, the results table (the chosen
iteration marked) and the inspect chats show that run's numbers and texts as they are on disk; it shows the
progress of every stage from the events a run writes (progress.json); then it starts a second run, keeps the
first click's message when a second click is refused, aborts the run, continues it, and continues it again past
its planned iterations, with the plots drawing the new iteration on the open page. A screenshot of each tab goes
to test-artifacts/. Skips only when /usr/bin/chromium is missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spin_lite.app import chat, form, views
from spin_lite.state import RunDir
from conftest import hold_run, start_app, stop_app
from test_app import DEMO, REPO, make_workspace, tiny_config

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
# Headless, as root, on machines with no outside network: no sandbox, no GPU, no background traffic.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """`python app.py` on a free localhost port, over a workspace with the tiny model and a tiny config."""
    ws = make_workspace(tmp_path_factory.mktemp("browser-ws"))
    shutil.rmtree(ws / "data")  # the guided flow starts from the bundled sample: only the model is here
    ARTIFACTS.mkdir(exist_ok=True)
    server, url = start_app(ws, ARTIFACTS / "app-browser-server.log", timeout_s=90)
    yield url, ws
    stop_app(server, ws)


@pytest.fixture(scope="module")
def page(app):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(app[0])
        yield page
        browser.close()


def shot(page, name: str):
    page.screenshot(path=str(ARTIFACTS / f"app-{name}.png"), full_page=True)


def failure_name() -> str:
    """The failing test's own screenshot name (a later test's failure does not overwrite it)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "unknown").split("::")[-1].split(" ")[0]
    return f"failure-{test}"


def under_the_button(page, button: str, message: str, timeout_s: float = 30):
    """Wait until `message` shows right under `button` and inside the window. Both boxes are read in one
    round trip and the check is retried: the form above may still grow (its problems line) while it runs."""
    deadline, boxes = time.time() + timeout_s, None
    while time.time() < deadline:
        boxes = page.evaluate("([b, m]) => [b, m].map(s => { const r = document.querySelector(s)"
                              ".getBoundingClientRect(); return {y: r.y, height: r.height}; })", [button, message])
        (b, m), height = boxes, page.viewport_size["height"]
        if 0 <= m["y"] - (b["y"] + b["height"]) < 80 and 0 <= m["y"] and m["y"] + m["height"] <= height:
            return
        time.sleep(0.5)
    shot(page, failure_name())
    raise AssertionError(f"{message} is not right under {button} inside the window: {boxes}")


def textbox(page, elem_id: str):
    return page.locator(f"#{elem_id}").get_by_role("textbox")


def wait_for_text(page, selector: str, pattern: str, timeout_s: float = 90):
    """Wait until the element's text matches `pattern` (a regex); fail with what it showed (and a screenshot)."""
    deadline, text = time.time() + timeout_s, ""
    while time.time() < deadline:
        text = page.locator(selector).evaluate(  # what it shows, text boxes' values included
            "el => el.innerText + '\\n' + [...el.querySelectorAll('textarea, input')].map(e => e.value).join('\\n')")
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    shot(page, failure_name())
    raise AssertionError(f"{selector} never matched {pattern!r}; it shows:\n{text}")


def plotted(page, elem_id: str, x: str, y: str, color: str | None = None) -> dict:
    """The points of a native plot, read from the accessible labels of its SVG marks: {(color, x): y}."""
    labels = page.locator(f"#{elem_id} [aria-label]").evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    points = {}
    for label in labels:
        fields = dict(part.split(": ", 1) for part in label.split("; ") if ": " in part)
        if x in fields and y in fields:
            points[(fields.get(color) if color else None, fields[x])] = fields[y].replace("\u2212", "-")  # vega's minus
    return points


def wait_for_plot(page, elem_id: str, x: str, y: str, color: str | None, expected: dict, timeout_s: float = 90):
    """Wait until the plot shows exactly the `expected` points ({(color, x): y}, y to the axis' 3 decimals)."""
    deadline, shown = time.time() + timeout_s, {}
    while time.time() < deadline:
        shown = plotted(page, elem_id, x, y, color)
        try:  # a plot being redrawn may show a point without its value for a moment
            # the labels print values as the y axis does (3 decimals): equal to half a unit in the last place
            if {k: float(v) for k, v in shown.items()} == pytest.approx(expected, rel=1e-6, abs=5e-4 + 1e-9):
                return
        except ValueError:
            pass
        time.sleep(0.5)
    shot(page, failure_name())
    raise AssertionError(f"#{elem_id} shows {shown}, expected {expected}")


# The tiny sizes the flow sets under "Advanced settings" (each in its topic, form.topic); the rest stay the preset's.
TINY_ADVANCED = {"data.max_examples": 8, "data.eval_size": 4, "data.val_size": 4, "data.max_prompt_length": 96,
                 "data.max_length": 160, "generation.max_new_tokens": 8, "generation.batch_size": 8, "train.epochs": 1,
                 "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2, "eval.max_new_tokens": 8}


def field(page, key: str):
    """The input of one setting of the Setup form (a text box, a number box or a dropdown's input)."""
    return page.locator(f"#cfg-{key.replace('.', '-')}").locator("input, textarea").first


def choose(page, elem_id: str, label: str):
    """Pick an option of a dropdown by its label."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=label, exact=True).click()


def opens_on_the_chosen_model(page, ws, tab: str, elem_id: str, then: str):
    """The tab's model menu shows the model the run chose (views.model_menus); then pick the model `then` ("iter 1")."""
    choices, value = views.model_menus(ws, "runs/web")[tab]
    label = dict((v, l) for l, v in choices)
    wait_for_text(page, f"#{elem_id}", f"(?m)^{re.escape(label[value])}$")  # the input's value: the whole line
    choose(page, elem_id, label[then])
    wait_for_text(page, f"#{elem_id}", f"(?m)^{re.escape(label[then])}$")


def set_field(page, key: str, value):
    box = field(page, key)
    box.fill(str(value))
    box.press("Tab")  # a number box reports its value when it loses focus


def checkbox(page, key: str):
    return page.locator(f"#cfg-{key.replace('.', '-')} input[type=checkbox]")


def fill_tiny_form(page, iterations: int, run_dir: str):
    """The Setup form for a run of the tiny model, whatever it showed: SPIN alone (no SFT stage, no control) at
    lr 0.01, the tiny sizes under Advanced, and the stop rule judging every iteration without stopping the run."""
    set_field(page, "model.name", "models/tiny")
    set_field(page, "iterations", iterations)
    set_field(page, "run_dir", run_dir)
    set_field(page, "train.lr_ratio_to_sft", "")  # the rate as typed, not a fraction of an SFT stage's
    set_field(page, "train.learning_rate", 0.01)
    checkbox(page, "sft.enabled").uncheck()
    checkbox(page, "sft.control").uncheck()
    if not page.locator("#advanced-data").is_visible():
        page.locator("#advanced .label-wrap").first.click()
    page.locator("#advanced-data").wait_for(state="visible")
    looked_at = set()  # each topic clicked at most once: a second click while it opens would close it again
    for key in [*TINY_ADVANCED, "train.stop_when", "train.gradient_checkpointing"]:
        box = page.locator(f"#cfg-{key.replace('.', '-')}")
        if form.topic(key) not in looked_at and not box.is_visible():  # its topic is closed: open it
            page.locator(f"#advanced-{form.topic(key)} .label-wrap").first.click()
        looked_at.add(form.topic(key))
        box.wait_for(state="visible")
    for key, value in TINY_ADVANCED.items():
        set_field(page, key, value)
    checkbox(page, "train.gradient_checkpointing").uncheck()
    field(page, "train.stop_when").click()  # the stop rule judges every iteration but runs them all
    page.get_by_role("option", name="never", exact=True).click()


def test_set_up_run_and_inspect_a_tiny_run(app, page):
    """The first screen is the CPU demo preset; from a workspace holding only a model folder: the model's check
    beside it, the bundled sample data previewed, tiny sizes under Advanced, a bad setting's error next to the
    button, a time estimate, then the run."""
    url, ws = app
    page.get_by_role("tab", name="Setup").click()
    assert not (ws / "data").exists() and not (ws / "runs").exists() and not (ws / "configs").exists()
    # The recommended recipe on a machine without CUDA, not the config's defaults: the settings shown first
    preset = dict(zip([s.key for s in form.settings()], form.form_values(form.preset_config("CPU demo"))))
    assert page.locator("#preset input").first.input_value() == "CPU demo"
    for key in form.FIRST:
        shown = checkbox(page, key).is_checked() if isinstance(preset[key], bool) else field(page, key).input_value()
        assert shown == (preset[key] if isinstance(preset[key], bool) else str(preset[key])), key
    assert preset["data.path"] == "sample:demo" and preset["train.lr_ratio_to_sft"] == "0.25"  # (the demo's)
    wait_for_text(page, "#yaml-preview", r"lr_ratio_to_sft: 0\.25")

    # A mistyped model: the CLI's message beside the model field, at once (HF_HUB_OFFLINE here)
    set_field(page, "model.name", "models/tinyy")
    wait_for_text(page, "#model-check", r"no such folder \S+/models/tinyy \(relative to the workspace [\s\S]*HF_HUB_OFFLINE",
                  timeout_s=30)
    model, check = (page.locator(s).bounding_box() for s in ("#cfg-model-name", "#model-check"))
    assert check["x"] > model["x"] + model["width"] / 2 and abs(check["y"] - model["y"]) < model["height"]  # beside
    set_field(page, "model.name", "models/tiny")
    page.wait_for_function("() => !document.querySelector('#model-check').innerText.trim()")

    fill_tiny_form(page, iterations=2, run_dir="runs/web")
    yaml_text = wait_for_text(page, "#yaml-preview", r"stop_when: never")
    assert "max_examples: 8" in yaml_text and "name: models/tiny" in yaml_text and "path: sample:demo" in yaml_text

    # The prompt as the model sees it, the response, the token counts and any problem first; the raw columns last.
    page.locator("#preview-data").click()
    preview = wait_for_text(page, "#preview-table", r"<\|im_start\|>user\s+Why is the sky blue\?")
    assert re.search(r'messages: \[\{"role": "user", "content": "Why is the sky blue\?"', preview)
    headers = page.locator("#preview-table thead th").evaluate_all("els => els.map(e => e.innerText.trim())")
    assert [h for h in headers if h] == ["row", "problem", "prompt", "response", "prompt tokens", "response tokens",
                                         "raw columns"]
    wait_for_text(page, "#preview-msg", r"140 rows in sample:demo; columns messages \(read as chat")

    # A bad setting: its error shows right under the button that was clicked, inside the window, once, and goes
    # when the setting is mended (it was shown twice, and stayed under the button after the fix).
    set_field(page, "train.learning_rate", -1)
    said = "train.learning_rate must be a positive number"
    try:
        wait_for_text(page, "#config-problems", said.replace(".", r"\."))  # as typed
        page.locator("#start-run").click()
        wait_for_text(page, "#setup-error", r"Error[\s\S]*" + said.replace(".", r"\."))
        under_the_button(page, "#start-run", "#setup-error")
        assert page.locator("#tab-setup").inner_text().count(said) == 1
        assert not (ws / "runs").exists()  # nothing was started
    finally:  # the next test starts from this form
        set_field(page, "train.learning_rate", 0.01)
    wait_for_text(page, "#yaml-preview", r"learning_rate: 0\.01")
    page.wait_for_function("() => !document.querySelector('#setup-error').innerText.trim() && "
                           "!document.querySelector('#config-problems').innerText.trim()")

    # The time estimate, measured here with this model, before starting.
    page.locator("#estimate-time").click()
    estimate = wait_for_text(page, "#time-estimate", r"Estimate: about .* for 2 iteration", timeout_s=300)
    assert all(stage in estimate for stage in ("generate", "score", "train", "evaluate"))
    cli = wait_for_text(page, "#cli-preview", r"spin-lite run")
    assert "data.max_examples=8" in cli and "run_dir=runs/web" in cli
    shot(page, "setup")

    # Run: start it, wait for the end; the plots show the numbers of its files.
    page.locator("#start-run").click()
    wait_for_text(page, "#setup-msg", "started the run runs/web ", timeout_s=120)
    page.get_by_role("tab", name="Run").click()
    wait_for_text(page, "#run-status", r"runs/web: finished — 2 of 2", timeout_s=600)
    run = ws / "runs" / "web"
    steps = {t: [json.loads(line) for line in (run / f"iter-0{t}" / "train_log.jsonl").read_text().splitlines()]
             for t in (0, 1)}
    best = RunDir(run).best_iteration()
    assert best is not None  # data.val_size: 4 validation rows
    wait_for_text(page, "#run-status", f"best on the validation rows: {'the starting model' if best < 0 else f'iteration {best}'}")
    # The grid draws its cells outside plain table rows; its text (values included) is read whole.
    table = wait_for_text(page, "#results-table", r"iter 1")
    assert "test logp/tok" in table and "chosen" in table and "iterations" not in table
    assert re.search(r"\bbest\b", table) and not re.search(r"\d\.\d{4,}", table)  # marked; 3 decimals at most
    in_order = steps[0] + steps[1]  # x: the optimizer step over both iterations
    labels = [f"iter {t}" for t in (0, 1) for _ in steps[t]]  # each step's point, coloured by its iteration
    for metric in ("loss", "margin", "accuracy"):
        wait_for_plot(page, f"plot-{metric}", "optimizer step (all iterations)", metric, "iteration",  # x title
                      {(label, str(n)): r[metric] for n, (label, r) in enumerate(zip(labels, in_order), 1)
                       if r[metric] is not None})  # (a step whose pairs are all ties has no accuracy: no point)
    held_out = {"start": json.loads((run / "eval-start.json").read_text())["metrics"],
                **{f"iter {t}": json.loads((run / f"iter-0{t}" / "eval.json").read_text())["test"] for t in (0, 1)}}
    for metric in ("logp_per_token", "margin_accuracy"):
        wait_for_plot(page, f"plot-{metric}", "model", metric, None,
                      {(None, model): m[metric] for model, m in held_out.items() if m[metric] is not None})
    wait_for_text(page, "#run-log", r"SPIN results for runs/web")
    wait_for_text(page, "#runs-overview", r"runs/web\s+finished")
    shot(page, "run")

    # Inspect: the held-out samples of the last iteration, side by side, and a search.
    samples = [json.loads(line) for line in (run / "iter-01" / "samples.jsonl").read_text().splitlines()]
    page.get_by_role("tab", name="Inspect").click()
    opens_on_the_chosen_model(page, ws, "inspect", "inspect-which", then="iter 1")
    wait_for_text(page, "#inspect-summary", r'"iteration"\s*:\s*1')
    # the start's samples share the real answers: wait for iteration 1's own (its opponent column) before reading
    table = wait_for_text(page, "#inspect-table",
                          rf"^(?![\s\S]*starting model)[\s\S]*{re.escape(samples[0]['real'][:40])}")
    for s in samples:
        assert s["real"][:40] in table and s["opponent"].split()[0] in table
        assert not s["model"].split() or s["model"].split()[0] in table  # the new model's reply (random tokens)
    wait_for_text(page, "#inspect-summary", r'"iteration"\s*:\s*1')
    assert "<|im_start|>" not in table  # chats as turns, not template text
    assert page.locator("#inspect-table .spin-sample").count() == len(samples)
    assert page.locator("#inspect-table .spin-sample").first.locator("[data-role=user]").count() >= 1
    shot(page, "inspect")
    question = samples[-1]["prompt"].split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
    matching = [s for s in samples if any(question.lower() in s[c].lower() for c in ("prompt", "real", "opponent", "model"))]
    textbox(page, "inspect-search").fill(question)
    page.wait_for_function("n => document.querySelectorAll('#inspect-table .spin-sample').length === n", arg=len(matching))
    assert question in page.locator("#inspect-table").inner_text()

    # Compare: both models answer into their own chat, as the handlers reply in this process.
    import torch

    question = [{"role": "user", "content": "Why is the sky blue?"}]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the app (OMP_NUM_THREADS=1): a random model's greedy choice is a near tie
    try:
        expected = {box: [*chat.chat_reply(ws, "runs/web", which, question, max_new_tokens=16)][-1]
                    for box, which in (("chat-start", "start"), ("chat-iter", "iter 1"))}
    finally:
        torch.set_num_threads(threads)
    page.get_by_role("tab", name="Compare").click()
    opens_on_the_chosen_model(page, ws, "compare", "compare-which", then="iter 1")
    page.locator("#compare-max-new input[type=number]").fill("16")
    page.locator("#compare-max-new input[type=number]").press("Enter")
    textbox(page, "chat-input").fill("Why is the sky blue?")
    page.locator("#chat-send").click()
    for box, text in expected.items():
        letters = re.sub(r"\W", "", text)[:12] or "notext"  # the letters: markdown may change the rest
        bot = wait_for_text(page, f"#{box} [data-testid=bot]", r"\W*".join(map(re.escape, letters)), timeout_s=180)
        assert "Error" not in bot and "Why is the sky blue?" in page.locator(f"#{box}").inner_text()
    shot(page, "compare")

    # Export: the adapter as a zip.
    page.get_by_role("tab", name="Export").click()
    opens_on_the_chosen_model(page, ws, "export", "export-which", then="iter 1")  # "best = ...", then iteration 1
    page.locator("#export-adapter").click()
    wait_for_text(page, "#export-msg", r"runs\+web-iter-01-adapter\.zip", timeout_s=300)
    assert (ws / "exports" / "runs+web-iter-01-adapter.zip").exists()
    page.locator("#export-gguf").click()  # one GGUF file, of the default type (q8_0)
    wait_for_text(page, "#export-msg", r"runs\+web-iter-01-gguf-q8_0/\S+\.gguf", timeout_s=300)
    assert list((ws / "exports" / "runs+web-iter-01-gguf-q8_0").glob("*.gguf"))
    shot(page, "export")


def legend(page, elem_id: str) -> list[str]:
    """The labels of a plot's colour legend: the iterations it draws (a point of one outside it is not drawn)."""
    return page.locator(f"#{elem_id} .role-legend-label text").evaluate_all("els => els.map(e => e.textContent)")


def test_abort_a_second_run_and_continue_it(app, page):
    """A second run of one iteration: a refused second Start keeps the first click's message; abort, Continue to
    the end, then Continue past the planned iterations with the page open: the plots draw the new iteration."""
    url, ws = app
    page.get_by_role("tab", name="Setup").click()
    fill_tiny_form(page, iterations=1, run_dir="runs/web2")  # whatever the test before left in the form
    wait_for_text(page, "#yaml-preview", r"run_dir: runs/web2")
    wait_for_text(page, "#yaml-preview", r"stop_when: never")
    page.locator("#data-upload input[type=file]").set_input_files(str(DEMO))  # an uploaded file this time
    page.wait_for_function("() => document.querySelector('#cfg-data-path textarea, #cfg-data-path input')"
                           ".value === 'uploads/demo_sft.jsonl'")
    wait_for_text(page, "#yaml-preview", r"path: uploads/demo_sft.jsonl")
    assert (ws / "uploads" / DEMO.name).exists()
    # At once, while the model and data are checked: the run menu (above the tabs) turns to the run being started,
    # and with it the Run tab (which showed the previous run until the checks were done, a minute and more for a large
    # model). Timed in the page itself, every frame: the menu's value against the launch's message.
    page.evaluate("""() => { window.turned = window.launched = null;
        const look = () => {
            const now = performance.now();
            if (!window.turned && document.querySelector('#run-dir input').value === 'runs/web2') window.turned = now;
            if (document.querySelector('#setup-msg').innerText.includes('started the run runs/web2 ')) {
                window.launched = now; return; }
            requestAnimationFrame(look); };
        requestAnimationFrame(look); }""")
    page.locator("#start-run").click()
    page.wait_for_function("() => window.launched !== null", timeout=120_000)
    turned, launched = page.evaluate("() => [window.turned, window.launched]")
    assert turned is not None and turned < launched, (turned, launched)  # the menu turned before the launch
    deadline = time.time() + 300
    while not (ws / "runs" / "web2" / "iter-00").exists() and time.time() < deadline:  # past the set-up
        time.sleep(0.02)
    assert (ws / "runs" / "web2" / "iter-00").exists(), views.run_log(ws, "runs/web2")
    # Held there (SIGSTOP): a tiny run ends within seconds, sooner than the page steps below; the abort's SIGKILL
    # ends it after its grace period
    hold_run(ws / "runs" / "web2")
    page.get_by_role("tab", name="Run").click()
    wait_for_text(page, "#run-status", r"runs/web2: ")
    page.get_by_role("tab", name="Setup").click()
    wait_for_text(page, "#setup-msg", "started the run runs/web2 ")
    page.locator("#start-run").click()  # the same run directory again, while it runs
    wait_for_text(page, "#setup-error", r"runs/web2 is already running")
    under_the_button(page, "#start-run", "#setup-error")  # the refusal right under its button
    wait_for_text(page, "#setup-msg", "started the run runs/web2 ")  # the launch's message stays

    # A page opened while it runs opens on the running run, not on the alphabetically first (runs/web)
    page.reload()
    page.get_by_role("tab", name="Run").click()
    wait_for_text(page, "#run-dir", r"(?m)^runs/web2$")
    wait_for_text(page, "#run-status", r"runs/web2: running")
    page.locator("#abort-run").click()
    wait_for_text(page, "#run-msg", r"aborted runs/web2")
    wait_for_text(page, "#run-status", r"runs/web2: aborted")
    shot(page, "run-aborted")

    page.locator("#continue-run").click()  # a checked copy of its config, as Start launches
    wait_for_text(page, "#run-msg", r"started the run runs/web2 ", timeout_s=120)
    wait_for_text(page, "#run-status", r"runs/web2: finished — 1 of 1 iterations complete", timeout_s=600)
    run = ws / "runs" / "web2"
    step_plot = lambda: {(f"iter {t}", str(n)): r["loss"] for n, (t, r) in enumerate(
        ((t, json.loads(line)) for t in (0, 1) if (run / f"iter-0{t}" / "train_log.jsonl").exists()
         for line in (run / f"iter-0{t}" / "train_log.jsonl").read_text().splitlines()), 1)}
    wait_for_plot(page, "plot-loss", "optimizer step (all iterations)", "loss", "iteration", step_plot())
    assert legend(page, "plot-loss") == ["iter 0"]

    # Past the planned iteration, on the open page: the new iteration's points drawn in a colour of their own
    page.locator("#continue-iterations input").fill("2")
    page.locator("#continue-iterations input").press("Tab")
    page.locator("#continue-run").click()
    # (running, unless this one iteration ended between two refreshes of the page)
    wait_for_text(page, "#run-status", r"runs/web2: (running|finished — 2 of 2)", timeout_s=120)
    wait_for_text(page, "#run-status", r"runs/web2: finished — 2 of 2 iterations complete", timeout_s=600)
    assert (run / "iter-01" / "summary.json").exists()
    wait_for_plot(page, "plot-loss", "optimizer step (all iterations)", "loss", "iteration", step_plot())
    deadline = time.time() + 30
    while legend(page, "plot-loss") != ["iter 0", "iter 1"] and time.time() < deadline:
        time.sleep(0.5)
    assert legend(page, "plot-loss") == ["iter 0", "iter 1"], legend(page, "plot-loss")
    log = wait_for_text(page, "#run-log", r"SPIN results for runs/web2")
    below, overflows = page.locator("#run-log .spin-log").evaluate(  # the log's end against the box's bottom edge
        "e => [e.querySelector('pre').getBoundingClientRect().bottom - e.getBoundingClientRect().bottom,"
        " e.scrollHeight > e.clientHeight]")
    assert overflows and -20 < below <= 0  # a log longer than its box, shown at its last line
    assert "aborted from the app" in (run / "run.log").read_text() and log
    shot(page, "run-continued")


# A process holding a run directory's lock, as `spin-lite run` does: the app shows the run as running.
HOLD = ("import sys, time\nfrom spin_lite.state import RunDir\nlock = RunDir(sys.argv[1]).lock()\n"
        "print('held', flush=True)\ntime.sleep(120)")


def test_progress_of_every_stage(app, page):
    """Each stage's progress as a run writes it (RunDir.progress -> progress.json) shows on the Run tab."""
    url, ws = app
    root = ws / "runs" / "stages"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(tiny_config("runs/stages").to_yaml())
    rd = RunDir(root)
    rd.set_state(status="running", iteration=0, stage="generate")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        page.get_by_role("tab", name="Run").click()
        select_run(page, "runs/stages")  # (typing once lost a race with the list's refresh: make test, 2026-12-07)
        wait_for_text(page, "#run-status", r"runs/stages: running")
        for stage, total, unit in (("generate", 4, "batches"), ("score", 24, "sequences"), ("train", 6, "steps"),
                                   ("evaluate val", 4, "prompts"), ("evaluate test", 4, "prompts")):
            rd.set_state(stage=stage)
            progress = rd.progress(0, stage, total)
            time.sleep(0.6)  # Progress writes at most twice a second
            progress(total // 2)
            wait_for_text(page, f"#run-status .spin-bar[data-stage='{stage}']",
                          rf"iteration 0 · {stage}: {total // 2}/{total} {unit}")
            if stage == "train":
                shot(page, "run-progress")
    finally:
        holder.kill()
        holder.wait()


def select_run(page, run_dir: str):
    """Type `run_dir` into the run menu, again until it stays there (a refresh of the list answered after the typing
    puts back the run the page opens on)."""
    page.get_by_role("button", name="Refresh run list").click()
    box = page.locator("#run-dir input")
    for _ in range(20):
        box.fill(run_dir)
        box.press("Enter")
        time.sleep(1.5)
        if box.input_value() == run_dir:
            return
    raise AssertionError(f"the run menu shows {box.input_value()!r}, not {run_dir!r}")


def test_notes_and_labels_follow_the_selected_run(app, page):
    """Export's note is the selected run's, also when its menu stays on "best" as the run menu changes (it kept
    describing the run before); Inspect names the starting model's responses as such, with no empty opponent column."""
    from test_app import fake_run

    url, ws = app
    for name, accepted in (("note-start", [False, False]), ("note-iter", [True, True, False])):
        root = fake_run(ws / "runs" / name, accepted)
        (root / "state.json").write_text('{"status": "finished"}')
    start = ws / "runs" / "note-start" / "eval-start.json"
    start.write_text(json.dumps({"metrics": {}, "val": {}, "samples": [
        {"prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "real": "Four.",
         "opponent": None, "model": "It is four."}]}))
    page.get_by_role("tab", name="Export").click()
    select_run(page, "runs/note-start")
    wait_for_text(page, "#export-msg", r"The stop rule chose the starting model")
    select_run(page, "runs/note-iter")  # its menu opens on "best" too: no change of the menu's value
    wait_for_text(page, "#export-which", r"best = iter 1 \(chosen\)")
    page.wait_for_function("() => !document.querySelector('#export-msg').innerText.includes('starting model')",
                           timeout=20_000)
    choose(page, "export-which", "iter 2 (rejected by the stop rule)")
    wait_for_text(page, "#export-msg", r"Warning: the stop rule rejected iteration 2")

    page.get_by_role("tab", name="Inspect").click()
    select_run(page, "runs/note-start")
    wait_for_text(page, "#inspect-which", r"(?m)^start \(chosen\)$")
    table = wait_for_text(page, "#inspect-table", r"It is four\.")
    assert "starting model" in table and "new model" not in table and "opponent" not in table
    assert page.locator("#inspect-table .spin-answer").count() == 2  # real, starting model: no empty column
    shot(page, "inspect-start")
