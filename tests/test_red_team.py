"""Red team (issue 27): every escape, crash and loss found against the app replayed through its HTTP API (gradio_client,
with a password set, as a remote user would), and the CLI's cases, on files planted on disk. Fails on any escape
(a file outside the workspace written, read or offered), any traceback or "unexpected error", a crash of the app,
and any silent loss (a run's config or files changed by a request that was refused).

    python -m pytest -q tests/test_red_team.py                               # the fast set, in `make test` (< 60 s)
    SPIN_LITE_RED_TEAM=full python -m pytest -q tests/test_red_team.py       # also the slow cases: `make red-team`

The fast set shares one app server and one workspace; each case uses run directories of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spin_lite.app import form, workspace
from spin_lite.state import RunDir
from conftest import start_app, stop_app
from test_app import DEMO, REPO, fake_run, made_run, make_workspace, tiny_config

client_module = pytest.importorskip("gradio_client")
FULL = os.environ.get("SPIN_LITE_RED_TEAM") == "full"
full_only = pytest.mark.skipif(not FULL, reason="the slow red-team cases: SPIN_LITE_RED_TEAM=full (make red-team)")
AUTH = ("red", "team-secret")
KEYS = [s.key for s in form.settings()]
# What no reply may hold: a crash shown as text, or Gradio's generic error for a handler that raised.
CRASH = ("Traceback", "unexpected error", "upstream Gradio app has raised an exception")
MAX_REPLY = 200_000  # characters: a refusal names the problem, it does not repeat megabytes of input
# A YAML "billion laughs" in one form value: 9^6 (531,441) values from 200 characters (the took 435 s).
ALIAS_BOMB = ("[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
              "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e]]")
# A process holding a run directory's lock and writing `pid` into the lock file: a forged lock record.
FORGE = ("import sys, time\nfrom spin_lite.state import RunDir\nlock = RunDir(sys.argv[1]).lock()\n"
         "lock.seek(0); lock.truncate(); lock.write(sys.argv[2].encode())\nprint('held', flush=True)\ntime.sleep(120)")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("red-team-ws"))


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A folder outside the workspace; every test checks it still holds exactly this."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.jsonl").write_text(DEMO.read_text())
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "adapter" / "adapter_model.safetensors").write_text("not yours")
    return folder


def contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def nothing_escapes(outside):
    before = contents(outside)
    yield
    assert contents(outside) == before and not any(p.is_symlink() for p in outside.rglob("*"))


@pytest.fixture(scope="module")
def app(ws, tmp_path_factory):
    """`python app.py` with a password (SPIN_LITE_APP_AUTH), its output in a log that must never show a traceback."""
    log_path = tmp_path_factory.mktemp("red-team-log") / "app.log"
    server, url = start_app(ws, log_path, SPIN_LITE_APP_AUTH=":".join(AUTH))
    client = client_module.Client(url, auth=AUTH, verbose=False)
    yield client, server, url
    alive = server.poll() is None
    stop_app(server, ws)
    assert alive, "the app crashed:\n" + log_path.read_text()[-3000:]
    raised = tracebacks(log_path.read_text())
    assert not raised, "\n".join(raised)


# Gradio's own refusals of a value before any handler runs (a file of a type its box does not take, a chat message of
# the wrong shape, a menu value not among the menu's choices): logged with a traceback, answered with their reason.
GRADIO_REFUSALS = ("gradio.exceptions.Error:", "pydantic_core._pydantic_core.ValidationError:")


def tracebacks(log: str) -> list[str]:
    """The last line (the exception) of every traceback in the app's log, other than Gradio's own refusals."""
    found = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        last = next((line for line in block.splitlines()[1:] if line and not line.startswith(" ")), "?")
        if not last.startswith(GRADIO_REFUSALS):
            found.append(last)
    return found


def answer(client, *args, api_name: str) -> str:
    """A reply as text, checked: no crash, no generic error, no megabytes."""
    try:
        out = client.predict(*args, api_name=api_name)
    except client_module.exceptions.AppError as e:  # Gradio's own refusal of a value: its reason is sent
        out = str(e)
    text = json.dumps(out, default=str) if not isinstance(out, str) else out
    assert not any(word in text for word in CRASH), (api_name, text[:2000])
    assert len(text) < MAX_REPLY, (api_name, len(text))
    return text


def values(run_dir: str, **extra) -> list:
    return form.form_values(tiny_config(run_dir, **extra))


def upload(client, tmp_path: Path, name: str, text: str) -> str:
    """Send a file through the page's upload box that takes its type: data (/upload_data) or a config
    (/upload_config, which also loads it into the form)."""
    config = Path(name).suffix in (".yaml", ".yml")
    return answer(client, sent(tmp_path, name, text), api_name="/upload_config" if config else "/upload_data")


def sent(tmp_path: Path, name: str, text: str):
    path = tmp_path / "sent" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return client_module.handle_file(str(path))


# -- the password ---------------------------------------------------------------------------------------------------
def test_no_request_without_the_password(app):
    _, _, url = app
    with pytest.raises(Exception):
        client_module.Client(url, verbose=False).predict("runs/x", api_name="/abort_run")
    with pytest.raises(Exception):
        client_module.Client(url, auth=("red", "wrong"), verbose=False)


# -- uploads are data only ------------------------------------------------------------------------------------------
def test_uploads_never_become_runs_or_process_records(app, ws, tmp_path):
    """app-launch.yaml (run_dir: uploads), state.json of [1], app-run.json naming the app, config.yaml and .lock sent
    as uploads: stored under other names; uploads/ is never a run; the Run tab reads every run as before; Abort of
    uploads/ signals nothing."""
    client, server, _ = app
    made_run(ws, "runs/rt-upload-beside")
    before = answer(client, None, api_name="/refresh_runs")
    for name, text in (("app-launch.yaml", "run_dir: uploads\niterations: 1\n"), ("state.json", "[1]\n"),
                       ("app-run.json", json.dumps({"pid": server.pid, "process_start": 1})),
                       ("config.yaml", "iterations: 1\n"), (".lock.json", str(server.pid))):
        reply = upload(client, tmp_path, name, text)
        assert "uploads/upload-" in reply, (name, reply)
    assert not {"state.json", "app-run.json", "config.yaml", "app-launch.yaml", ".lock"} & {
        p.name for p in (ws / "uploads").iterdir()}
    runs = answer(client, None, api_name="/refresh_runs")
    assert "uploads" not in runs and runs == before
    view = answer(client, "runs/rt-upload-beside", api_name="/run_view")
    assert "runs/rt-upload-beside</b>: not started" in view
    assert "uploads is not running" in answer(client, "uploads", api_name="/abort_run")
    refusal = answer(client, *values("uploads"), api_name="/start")
    assert "app's uploads/ folder" in refusal
    assert "Invalid file type" in answer(client, sent(tmp_path, "x.sh", "rm -rf /"), api_name="/upload_data")
    assert server.poll() is None


# -- Save config, the form's values ------------------------------------------------------------------------------------
def test_save_config_cannot_overwrite_a_runs_config(app, ws):
    client, _, _ = app
    run = made_run(ws, "runs/rt-kept")
    before = (run / "config.yaml").read_bytes()
    changed = values("runs/rt-kept", **{"train.beta": 5, "train.learning_rate": 0.05, "sft.enabled": True})
    for path in ("runs/rt-kept/config.yaml", "runs/rt-kept/app-launch.yaml", "runs/rt-kept/iter-00/c.yaml"):
        reply = answer(client, path, *changed, api_name="/save")
        assert "inside the run directory runs/rt-kept" in reply
    assert (run / "config.yaml").read_bytes() == before and sorted(p.name for p in run.iterdir()) == [
        ".lock", "config.yaml", "state.json"]


def test_an_alias_bomb_or_a_huge_value_in_one_field_is_refused_at_once(app):
    client, _, _ = app
    bomb = values("runs/rt-bomb")
    bomb[KEYS.index("train.beta")] = ALIAS_BOMB
    huge = values("runs/rt-bomb")
    huge[KEYS.index("data.system_prompt")] = "x" * 200_000
    for form_values, named in ((bomb, "train.beta is not valid YAML: anchors and aliases"),
                               (huge, "data.system_prompt: at most 20,000 characters")):
        for api_name in ("/show_config", "/start", "/estimate"):
            started = time.time()
            assert named in answer(client, *form_values, api_name=api_name), api_name
            assert time.time() - started < 10, api_name


# -- Abort -----------------------------------------------------------------------------------------------------------
def test_abort_never_names_or_signals_a_process_the_app_did_not_start(app, ws):
    """A run held by a process the app did not start, whose lock file names the app's own pid and whose app-run.json
    names the holder with its true start time: Abort refuses, never says "kill" the app, and signals nothing."""
    client, server, _ = app
    root = made_run(ws, "runs/rt-forged")
    holder = subprocess.Popen([sys.executable, "-c", FORGE, str(root), str(server.pid)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        (root / "app-run.json").write_text(json.dumps({"pid": holder.pid, "process_start": int(start)}))
        reply = answer(client, "runs/rt-forged", api_name="/abort_run")
        assert "did not start" in reply and str(server.pid) not in reply and "kill" not in reply
        assert str(server.pid) not in answer(client, "runs/rt-forged", api_name="/run_view")
        assert holder.poll() is None and server.poll() is None
    finally:
        holder.kill()
        holder.wait()


# -- links planted on disk -----------------------------------------------------------------------------------------
def test_links_planted_in_a_run_are_refused_by_every_reader(app, ws, outside, tmp_path):
    """An adapter and a samples file replaced by links to outside the workspace: Export, Compare, Inspect and the
    Run tab refuse them by name through the API, and the CLI's export and table too; nothing outside is zipped."""
    client, _, _ = app
    root = fake_run(ws / "runs" / "rt-linked", [True])
    (root / "state.json").write_text('{"status": "finished"}')
    adapter = root / "iter-00" / "adapter"
    adapter.rename(root / "iter-00" / "adapter-real")
    adapter.symlink_to(outside / "adapter", target_is_directory=True)
    (root / "iter-00" / "samples.jsonl").unlink()
    (root / "iter-00" / "samples.jsonl").symlink_to(outside / "secret.jsonl")
    answer(client, "runs/rt-linked", api_name="/model_menus")  # this session's menus: the run's models
    reply = answer(client, "runs/rt-linked", "iter 0", "bfloat16", "q8_0", "", "", False, api_name="/export_adapter")
    assert "symbolic link" in reply and ".zip" not in reply
    assert not list((ws / "exports").glob("rt-linked*")) if (ws / "exports").exists() else True
    chat = answer(client, "runs/rt-linked", "iter 0", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], 4,
                  api_name="/reply_iteration")
    assert "symbolic link" in chat
    assert "symbolic link" in answer(client, "runs/rt-linked", "iter 0", "", api_name="/inspect")
    cli = subprocess.run([sys.executable, "-m", "spin_lite", "export", "runs/rt-linked", "--iteration", "0", "--out",
                          "exports/rt-cli"], cwd=ws, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert cli.returncode == 2 and "symbolic link" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr[-2000:]
    assert not (ws / "exports" / "rt-cli").exists()


# -- launches --------------------------------------------------------------------------------------------------------
def test_a_launch_cannot_be_swapped_through_the_api(app, ws):
    """Start a real run, and in the seconds before it reads its config try to change it through Save config (the
    old launch file, and the run's config.yaml): refused; the run writes the config that was checked."""
    client, _, _ = app
    checked = values("runs/rt-swap")
    _, refusal, *_ = client.predict(*checked, api_name="/start")
    assert not refusal, refusal
    hostile = values("runs/rt-swap", **{"train.beta": 5, "iterations": 9})
    for path in ("runs/rt-swap/app-launch.yaml", "runs/rt-swap/config.yaml"):
        assert "inside the run directory" in answer(client, path, *hostile, api_name="/save")
    try:
        deadline = time.time() + 120
        while not (ws / "runs" / "rt-swap" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.2)
        from spin_lite.config import load_config
        assert load_config(ws / "runs" / "rt-swap" / "config.yaml") == form.config_from_form(checked)
    finally:
        assert "aborted runs/rt-swap" in answer(client, "runs/rt-swap", api_name="/abort_run")


# -- the slow set: whole runs ---------------------------------------------------------------------------------------
@full_only
def test_a_link_planted_after_continue_is_never_written_through(app, ws):
    """A whole run through the API, then Continue to a second iteration with `iter-01` planted as a link right after
    the launch: the run fails naming the link, the Run tab says so, and the finished iteration stays as it was."""
    client, _, _ = app
    _, refusal, *_ = client.predict(*values("runs/rt-full"), api_name="/start")
    assert not refusal, refusal
    deadline = time.time() + 600
    while "runs/rt-full</b>: finished" not in answer(client, "runs/rt-full", api_name="/run_view"):
        assert time.time() < deadline, answer(client, "runs/rt-full", api_name="/run_view")
        time.sleep(2)
    kept = contents(ws / "runs" / "rt-full" / "iter-00")
    target = ws.parent / "planted-target"
    target.mkdir()
    try:
        assert "started the run runs/rt-full" in answer(client, "runs/rt-full", 2, 0, api_name="/continue_run")
        (ws / "runs" / "rt-full" / "iter-01").symlink_to(target, target_is_directory=True)
        while "runs/rt-full</b>: running" in (view := answer(client, "runs/rt-full", api_name="/run_view")):
            assert time.time() < deadline, view
            time.sleep(1)
        assert "symbolic link" in view and list(target.iterdir()) == []
        assert contents(ws / "runs" / "rt-full" / "iter-00") == kept
    finally:
        (ws / "runs" / "rt-full" / "iter-01").unlink()
    answer(client, "runs/rt-full", api_name="/model_menus")
    reply = answer(client, "runs/rt-full", "best", "bfloat16", "q8_0", "", "", False, api_name="/export_adapter")
    assert "rt-full-" in reply and ".zip" in reply


@full_only
def test_every_endpoint_takes_hostile_names_without_a_crash(app, ws, tmp_path):
    """Each endpoint that takes a run directory or a model, given hostile names: a named refusal every time."""
    client, _, _ = app
    names = ["../x", "/etc", "uploads", "exports/a", "runs/a\0b", "r" * 5000, "runs/<img src=x onerror=alert(1)>",
             "runs/a;b", "-rf", "runs/" + "x" * 256]
    for name in names:
        answer(client, name, 0, 0, api_name="/continue_run")
        answer(client, name, api_name="/abort_run")
        answer(client, name, api_name="/run_view")
        answer(client, name, api_name="/model_menus")
        answer(client, name, None, "", api_name="/inspect")
        answer(client, name, None, api_name="/warn")
        answer(client, name, *values("runs/ok"), api_name="/save")
        answer(client, name, api_name="/load")
        hostile = values("runs/ok")
        hostile[KEYS.index("run_dir")] = name
        answer(client, *hostile, api_name="/start")
    for name in workspace.RUN_RECORDS:
        suffix = Path(name).suffix
        if suffix in workspace.UPLOAD_TYPES:
            assert "uploads/upload-" in upload(client, tmp_path, name, "{}")
    assert not any(r.startswith("uploads") for r in json.loads(answer(client, None, api_name="/refresh_runs")).get(
        "choices", []) if isinstance(r, str))
