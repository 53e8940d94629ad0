"""Shared fixtures: the real SmolLM2 tokenizer and chat template, and a tiny random model built from a config.

The tiny model has the real tokenizer's vocabulary, so prompts, responses and EOS handling are those of a
real chat model, while a forward pass takes milliseconds.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

# `make test` runs two pytest-xdist workers on 2 cores: one thread each, for the processes they start too
# (OpenMP threads waiting on a core another process holds make a run several times slower, not 2x).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "examples" / "data" / "demo_sft.jsonl"

# The longest test files first (measured with `pytest --durations`, 2 workers): `make test` hands whole files to
# its two workers in collection order, so a long file collected last would leave one worker idle at the end.
LONGEST_FIRST = ["test_app_browser.py", "test_notebook.py", "test_app.py", "test_sft.py", "test_embedded.py",
                 "test_resume.py", "test_cli_e2e.py", "test_reliability.py", "test_distributed.py", "test_method.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from spin_lite.model import embedded_model_dir
    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from spin_lite.config import ModelConfig
    from spin_lite.model import load_tokenizer
    return load_tokenizer(ModelConfig(name=str(embedded_dir)))


def make_tiny_model(path: Path, tokenizer, seed: int = 0) -> Path:
    """A 2-layer Llama with the real vocabulary (hidden 64: a multiple of 64 so nf4 blocks fit)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), tokenizer)


def tiny_settings(model_dir: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides for a run of the tiny model that takes seconds: 8 training prompts, 4 test and 4 validation rows
    held out; all iterations run (train.stop_when=never) unless a test asks for the stop rule."""
    settings = {
        "run_dir": run_dir, "iterations": 2, "model.name": model_dir, "data.path": DEMO_DATA,
        "data.max_examples": 8, "data.eval_size": 4, "data.val_size": 4, "train.stop_when": "never",
        "data.max_prompt_length": 96, "data.max_length": 160,
        "generation.max_new_tokens": 8, "generation.batch_size": 4, "train.epochs": 1,
        "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2, "train.learning_rate": 1e-2,
        "train.save_every": 1, "eval.max_new_tokens": 8, **extra}
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    from spin_lite.config import load_config

    def build(**extra):
        return load_config(None, tiny_settings(tiny_model_dir, tmp_path / "run", **extra))
    return build


def tree_digest(root: Path) -> dict[str, str]:
    """Hash of every file under root, by relative path (to show a directory was left as it was)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args, env=None, cwd=REPO):
    """Run `python -m spin_lite ARGS` in a real process."""
    import os
    import subprocess
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "spin_lite", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


def free_port() -> int:
    """A free localhost port for an app started by a test."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(ws: Path, log_path: Path | None = None, timeout_s: float = 180, **env: str):
    """`python app.py --workspace ws` on a free localhost port (one thread, offline, no analytics; `env` added), its
    output in `log_path` (or dropped); returns (the process, its url) once the page answers. Fails the test with the
    log's end when the app exits or does not answer within `timeout_s`."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **env}
    with open(log_path or os.devnull, "w") as log:  # (the app keeps its own handle)
        server = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--workspace", str(ws), "--port", str(port)],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return server, url
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail("the app did not start" + (f":\n{log_path.read_text()[-3000:]}" if log_path else ""))
            time.sleep(0.5)


def stop_app(server, ws: Path):
    """Stop an app started by start_app, then every run it left running: the runs outlive the app by design, and with
    the app gone so is the identity Abort signals (processes.LAUNCHED); a run's process group is its lock holder's
    (start_new_session)."""
    import signal

    from spin_lite.app import views
    from spin_lite.state import RunDir

    server.terminate()
    server.wait(timeout=30)
    for run in views.list_runs(ws):
        holder = RunDir(ws / run).lock_holder() if RunDir(ws / run).is_locked() else None
        if holder:
            try:
                os.killpg(holder, signal.SIGKILL)
            except ProcessLookupError:
                pass


def recorded_launch(monkeypatch) -> dict:
    """The app's main() with a stand-in for its Gradio page: what main() passes to launch() lands in the returned
    dict (host, share, auth, ...), and nothing is served."""
    pytest.importorskip("gradio")
    from spin_lite.app import ui

    launched = {}

    class Demo:
        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(ui, "build_demo", lambda ws: Demo())
    return launched


def hold_run(root: Path) -> int:
    """Freeze a run the app started (SIGSTOP to its process group, whose leader app-run.json names) so that an Abort
    lands in the middle of it however fast this machine is: a tiny run can otherwise finish between the test seeing
    it at work and the abort arriving. The abort's SIGTERM still ends it at once (a fatal signal ends a stopped
    process). Returns the group."""
    import json
    import signal

    pid = json.loads((root / "app-run.json").read_text())["pid"]
    os.killpg(pid, signal.SIGSTOP)
    return pid
