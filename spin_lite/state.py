"""The run directory: the run's state on disk, which is also its checkpoint. `RunDir` is its one contract.

    run_dir/
      config.yaml            the resolved config of the run
      state.json             where the run is (iteration, stage, status) and its best iteration; for display
      progress.json          the running stage's progress: {iteration, stage, done, total, rate}
      summary.json           the run's results table and its chosen model, written when a run ends
      sft/                   the SFT stage (sft.enabled), before iteration 0: checkpoint/, train_log.jsonl,
        adapter/             the SFT adapter: SPIN's starting model (RunDir.start_adapter)
        summary.json         written last: the stage is done                                     <- sft done
      eval-base.json         with the SFT stage: validation and test metrics of the model before it
      eval-start.json        validation and test metrics of the starting model, and its per-row scores (val_rows,
                             test_rows: spin_lite.evaluate.row_scores), which the stop rule's paired test reads
      proto.jsonl            the starting model's own responses (iteration 0's), by row key: tspin's proto-synthetic
                             responses, the same at every iteration
      iter-00/
        generations.jsonl    the opponent's responses, appended one finished batch at a time
        pairs.jsonl          (prompt, real, generated) token ids with the opponent's log-probs   <- generate done
        checkpoint/          last training checkpoint (adapter, optimizer, scheduler, RNG); removed when done
        train_log.jsonl      one line per optimizer step
        adapter/             the trained adapter, standard PEFT layout                          <- train done
        eval.json            validation and test metrics of the new model, and its per-row scores (as eval-start)
        samples.jsonl        test prompt, real, opponent and new model responses side by side
        summary.json         written last: the iteration is complete; says whether the stop rule accepted it
                                                                                                <- evaluate done
      control-00/            the control arm (sft.control), "SFT continued": the starting model trained by SFT on
                             the training rows for the optimizer steps of iterations 0..t together
        checkpoint/, train_log.jsonl, adapter/                                                  <- train done
        eval.json, samples.jsonl
        summary.json         written last: steps, metrics, its verdicts (`selection`: better than the best
                             control before it; `versus`: the final comparison with SPIN)       <- evaluate done
Every file a resume trusts is written to a temporary name and renamed into place, so a kill at any moment
leaves either the old file or the new one, never half of one. Every JSON file is read back through its typed record
(spin_lite.records, by read_json and read_jsonl): a damaged or edited one is refused by name, never a traceback.

Which adapters make the model after iteration n (RunDir.adapters_after), for the run, the export and the app:
  stack mode: the adapter of iteration n alone (each iteration's adapter starts as a copy of the one before);
  merge mode: the starting adapter and the adapters of iterations 0..n, all active over the same base.
The starting adapter is the SFT stage's when there is one, else model.adapter (RunDir.start_adapter). A control's
adapter stands alone in either mode (it continues the starting adapter itself).

Which model was chosen, among the start, the SPIN iterations and the control: RunDir.chosen_model, read by the
table, the export, the app and the notebook.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

from .records import RunRecordError, read_record, read_records

_TMP_NAME = re.compile(r"\.\d+-\d+\.tmp$")  # atomic_write_text's temporary names


class LinkError(RuntimeError):
    """A symbolic link where a run directory holds a file or folder of its own: refused where it is used."""


def confined(root: Path, path: Path, contents: bool = False) -> Path:
    """`path`, inside the run directory `root`, as it may be used now: LinkError when a symbolic link stands at it or
    at any folder between `root` and it (with `contents`: also among the files of the folder `path`). `root` itself
    may be a link (a run directory kept on another disk); nothing it holds may be, so nothing read or written through
    `path` lands outside it. The one check of the run's folders (RunDir.iteration, control, sft_dir), its atomic
    writes and the model files it and the app read, made at the point of use rather than once at launch (a link
    planted in a running run's folder was written through before)."""
    root, path = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise LinkError(f"{path} is outside the run directory {root}") from None
    step = root
    for part in parts:
        step = step / part
        if step.is_symlink():
            raise LinkError(f"{step} is a symbolic link; a run directory's own files and folders are never links, so "
                            "it is neither read nor written through (remove the link)")
    if contents and path.is_dir():
        for entry in os.scandir(path):
            if entry.is_symlink():
                raise LinkError(f"{Path(entry.path)} is a symbolic link; a run directory's own files and folders are "
                                "never links, so it is neither read nor written through (remove the link)")
    return path


# The run directories whose lock this process has taken (RunDir.lock), as absolute paths: every atomic write under
# one of them is confined to it (`_confine_write`), whichever code makes it.
_LOCKED_ROOTS: set[Path] = set()


def _confine_write(path: Path):
    """LinkError when `path` is inside a run directory this process has locked and a link stands between the two."""
    path = Path(os.path.abspath(path))
    for root in tuple(_LOCKED_ROOTS):  # (another thread may add one meanwhile)
        if root in path.parents:
            confined(root, path.parent)


def open_append(path: Path):
    """`path` opened for appending text, refusing links like atomic_write_text: no link at a folder above it inside a
    run directory this process has locked (LinkError), and none at the file itself (O_NOFOLLOW: OSError ELOOP). The
    appended logs (generations.jsonl, train_log.jsonl) go through it, so a link planted after launch is refused
    where the write happens."""
    _confine_write(path)
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644), "a", encoding="utf-8")


def atomic_write_text(path: Path, text: str):
    """Write `path` whole or not at all: a temporary file of this process and thread, renamed into place.

    The temporary name is unique (two writers of the same file never share one) and is created anew, never
    through a symlink; the rename replaces a link at `path` itself rather than writing where it points. In a run
    directory this process has locked, a link at a folder above `path` is refused (confined).
    """
    _confine_write(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    if os.path.lexists(tmp):  # left by a killed process whose pid came round again
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: Path, default=None):
    """A JSON file of a run directory, checked against its record (spin_lite.records: by its place in the run
    directory), as parsed; `default` when there is no file. RunRecordError (the file, the field, what was expected)
    when it is not JSON or does not fit its record."""
    return read_record(path, default)


def read_jsonl(path: Path) -> list[dict]:
    """The lines of a JSON-lines file of a run directory, each checked against its record; [] without the file."""
    return read_records(path)


def replace_dir(tmp: Path, target: Path):
    """Move the finished folder `tmp` to `target`; the old `target` survives until the new one is in place.

    The old folder is set aside under a name of this call's own (TARGET.old-PID-RANDOM, created by the rename, never
    an existing name), so nothing this call did not create is ever removed: a folder the user named TARGET.old stays.
    A kill between the two renames leaves TARGET missing and the old folder under that name: recover_dir puts it back.
    Inside a run directory this process holds, neither folder may be (or pass through) a link (_confine_write).
    """
    _confine_write(tmp / "x")
    _confine_write(target)
    old = target.with_name(f"{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    if target.exists() or target.is_symlink():
        os.rename(target, old)  # (old is a fresh name: the rename cannot replace anything)
        fault_point("replace_dir", 1)  # killed here: TARGET missing, the old folder set aside (recover_dir's case)
    os.replace(tmp, target)
    if old.is_symlink() or old.is_file():  # (what stood at target was a link or a file: removed as itself)
        old.unlink()
    elif old.exists():
        shutil.rmtree(old)


def set_aside(target: Path) -> list[Path]:
    """The folders replace_dir set aside for `target` (TARGET.old-PID-RANDOM) and did not remove: a kill came first."""
    pattern = re.compile(re.escape(target.name) + r"\.old-\d+-[0-9a-f]{8}")
    return [p for p in target.parent.glob(f"{glob.escape(target.name)}.old-*") if pattern.fullmatch(p.name)
            and p.is_dir() and not p.is_symlink()]


def recover_dir(target: Path):
    """After a kill inside replace_dir (called by the process that holds the run directory): put the old folder back
    if the new one never landed, and remove what replace_dir set aside and a kill kept it from removing."""
    aside = sorted(set_aside(target), key=lambda p: p.stat().st_ctime)  # (a rename sets ctime: the latest last)
    if aside and not target.exists():
        os.replace(aside.pop(), target)
    for p in aside:
        shutil.rmtree(p, ignore_errors=True)


# The stages of an iteration, in order, and the file whose presence marks each one done.
STAGES = (("generate", "pairs.jsonl"), ("train", "adapter/adapter_config.json"), ("evaluate", "summary.json"))
# The stages of a control (control-NN/), likewise.
CONTROL_STAGES = (("train", "adapter/adapter_config.json"), ("evaluate", "summary.json"))
# The control arms (sft.control_rates): SFT continued at the SFT rate, and at SPIN's own rate.
CONTROL_ARMS = ("sft", "spin")


def control_name(t: int, arm: str = "sft") -> str:
    """The model name of control t of an arm: "control N" (SFT rate) or "control-spin N" (SPIN's rate)."""
    return f"control {t}" if arm == "sft" else f"control-{arm} {t}"


def control_key(name: str) -> tuple[int, str]:
    """(t, arm) of "control N" or "control-spin N" (control_name's inverse)."""
    head, _, number = name.strip().rpartition(" ")
    return int(number), "sft" if head == "control" else head[len("control-"):]


def _gain(versus: dict) -> float:
    """A control's gain over SPIN's choice in its final comparison, on the metric that decided it."""
    verdict = versus.get("verdict") or {}
    decided = (verdict.get("differences") or {}).get(verdict.get("decided_by", "logp_per_token")) or {}
    return decided.get("difference", 0.0)

# Settings that may change between invocations of the same run directory without changing its results.
RESUMABLE_CHANGES = {"iterations", "run_dir", "train.report_to", "train.save_every", "eval.enabled",
                     "train.stop_when", "train.stop_patience", "train.stop_confidence",
                     "sft.control", "sft.control_rates"}  # the control arms add models beside SPIN's, change none

# Settings added after runs were made without them, with the value that reproduces such a run: a run
# directory whose config.yaml lacks one continues with this value.
LEGACY_VALUES = {"data.val_size": 0, "data.val_path": None, "train.sft_weight": 0.0, "train.stop_when": "never",
                 "eval.answer_regex": None, "sft.enabled": False, "eval.choose_by": "logp",
                 "data.allow_shared_prompts": True, "sft.control_rates": ["sft"], "train.autocast": "never",
                 "generation.decode_attention": "sdpa"}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- the config a run was started with ------------------------------------------------------------
    def changed_settings(self, settings: dict, resumable=RESUMABLE_CHANGES) -> list[str]:
        """Settings (nested dicts, as config.yaml holds them) that differ from the run's config.yaml, other than
        those a run may change when it continues; [] when the run is new or the settings match. The one rule for
        continuing a run, used by `spin-lite run`, the stage commands, the app and SFT."""
        if not self.config_path.exists():
            return []
        previous = self._stored_settings()
        previous = {**{k: v for k, v in LEGACY_VALUES.items() if k not in previous}, **previous}
        current = flatten(settings)
        return sorted(f"{k} ({previous.get(k)!r} -> {current.get(k)!r})" for k in set(previous) | set(current)
                      if k not in resumable and k in previous and previous.get(k) != current.get(k))

    def legacy_settings(self) -> dict:
        """LEGACY_VALUES for the settings that this run's config.yaml lacks (a run made by an earlier version)."""
        if not self.config_path.exists():
            return {}
        previous = self._stored_settings()
        return {k: v for k, v in LEGACY_VALUES.items() if k not in previous}

    def _stored_settings(self) -> dict:
        """config.yaml's settings, flattened."""
        import yaml
        return flatten(yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {})

    @property
    def proto_path(self) -> Path:
        return self.root / "proto.jsonl"

    def proto_responses(self) -> dict[str, list[int]]:
        """The starting model's own responses by row key (iteration 0's generated responses: tspin's proto-synthetic
        responses), from proto.jsonl, or from iteration 0's pairs in a run made before proto.jsonl existed."""
        if self.proto_path.exists():
            return {r["key"]: r["ids"] for r in read_jsonl(self.proto_path)}
        return {p["key"]: p["gen_ids"] for p in read_jsonl(self.iteration(0) / "pairs.jsonl") if p["split"] != "train_prev"}

    # -- iterations and their stages -------------------------------------------------------------------
    def stage_done(self, t: int, stage: str) -> bool:
        return confined(self.root, self.iteration(t) / dict(STAGES)[stage]).exists()

    def next_stage(self, t: int) -> str | None:
        """The first stage of iteration t that is not done, or None when the iteration is complete."""
        return next((name for name, _ in STAGES if not self.stage_done(t, name)), None)

    def trained_iterations(self) -> list[int]:
        """Iterations with a trained adapter, complete or not."""
        found = sorted(int(p.parent.parent.name[5:]) for p in self.root.glob("iter-*/adapter/adapter_config.json"))
        return [t for k, t in enumerate(found) if t == k]  # only the unbroken chain from iteration 0

    def adapters_after(self, n: int, mode: str, start_adapter: str | None = None) -> list[str]:
        """The adapters that make the model after iteration n (n = -1: the starting model), in order."""
        chain = ([start_adapter] if start_adapter else []) + [str(self.iteration(k) / "adapter") for k in range(n + 1)]
        chain = chain[-1:] if mode == "stack" else chain
        return [self.checked_model(a) for a in chain]

    def model_files(self, folder: str | Path) -> Path:
        """`folder`, a model folder of this run directory (an adapter, or the temporary folder one is saved to), as it
        may be read or written now: no link at it, among its files, or between the run directory and it (confined)."""
        return confined(self.root, Path(folder), contents=True)

    def checked_model(self, adapter: str) -> str:
        """An adapter of the chain: checked (model_files) when it is in this run directory, as given otherwise
        (model.adapter, a folder or hub id of the user's, confined by whoever launched the run)."""
        inside = Path(os.path.abspath(self.root)) in Path(os.path.abspath(adapter)).parents
        return str(self.model_files(adapter)) if inside else adapter

    def adapters_of(self, which: int | str, cfg) -> list[str]:
        """The adapters that make the model `which` names (resolve_model's answer: an iteration, -1 for the starting
        model, or "control N" / "control-spin N"), in order: what the chat, the export and the notebook load on the
        base."""
        if isinstance(which, str):  # SFT continued: its adapter stands alone (it continued the starting adapter)
            return [str(self.model_files(self.control(*control_key(which)) / "adapter"))]
        return self.adapters_after(which, cfg.mode, self.start_adapter(cfg))

    def samples_of(self, which: int | str) -> list[dict]:
        """The held-out samples (prompt, real, opponent and model responses) of the model `which` names, as in
        adapters_of; [] when it has none yet."""
        if which == -1:
            return (read_json(self.root / "eval-start.json") or {}).get("samples", [])
        folder = self.control(*control_key(which)) if isinstance(which, str) else self.iteration(which)
        path = folder / "samples.jsonl"
        return read_jsonl(path) if path.exists() else []

    def start_adapter(self, cfg) -> str | None:
        """The adapter of SPIN's starting model: the SFT stage's (sft.enabled), else model.adapter (or None)."""
        return str(self.sft_dir / "adapter") if cfg.sft.enabled else cfg.model.adapter

    # -- the SFT stage and the control arm ---------------------------------------------------------------
    @property
    def sft_dir(self) -> Path:
        return confined(self.root, self.root / "sft")

    def sft_done(self) -> bool:
        return (self.sft_dir / "summary.json").exists()

    def sft_trained(self) -> bool:
        """The SFT stage's adapter is saved (sft/adapter): its training is over, whether or not summary.json is."""
        return (self.sft_dir / "adapter" / "adapter_config.json").exists()

    def control(self, t: int, arm: str = "sft") -> Path:
        """The folder of the control matched to iteration t in the control arm `arm` (sft.control_rates): "sft",
        SFT continued at the SFT rate (control-NN/), or "spin", at SPIN's own rate (control-spin-NN/); confined:
        never a link."""
        return confined(self.root, self.root / (f"control-{t:02d}" if arm == "sft" else f"control-{arm}-{t:02d}"))

    def control_stage_done(self, t: int, stage: str, arm: str = "sft") -> bool:
        return confined(self.root, self.control(t, arm) / dict(CONTROL_STAGES)[stage]).exists()

    def completed_controls(self, arm: str = "sft") -> int:
        """Number of leading complete controls of an arm."""
        t = 0
        while self.control_stage_done(t, "evaluate", arm):
            t += 1
        return t

    def trained_controls(self, arm: str = "sft") -> list[int]:
        """Controls of an arm with a trained adapter, complete or not (the unbroken chain from control 0)."""
        t = 0
        while self.control_stage_done(t, "train", arm):
            t += 1
        return list(range(t))

    def control_summaries(self, arm: str = "sft") -> list[dict]:
        return [read_json(self.control(t, arm) / "summary.json") for t in range(self.completed_controls(arm))]

    # -- results ----------------------------------------------------------------------------------------
    def best_iteration(self) -> int | None:
        """The iteration chosen on the validation rows: the latest one the stop rule found better than the
        best model before it (found_better); -1 when none was (the starting model is the best); None without
        validation rows."""
        return _latest_better(self.summaries(), "iteration")

    def evaluation(self, key: str) -> dict:
        """What evaluating the model `key` ("start", "iter N" or "control N") wrote: eval-start.json or the model's
        eval.json ({} before it is written)."""
        if key == "start":
            return read_json(self.root / "eval-start.json") or {}
        folder = self.iteration(int(key.split()[-1])) if key.startswith("iter") else self.control(*control_key(key))
        return read_json(folder / "eval.json") or {}

    def val_rows(self, t: int) -> dict | None:
        """The per-row validation scores of the model after iteration t (-1: the starting model), by row key, as
        the stop rule's paired test reads them; None for a run made before they were stored."""
        return self.evaluation("start" if t < 0 else f"iter {t}").get("val_rows")

    def best_control(self, arm: str = "sft") -> int | None:
        """A control arm's own choice, by the stop rule's reading applied to its checkpoints: the latest control
        that was better on the validation rows than the best model before it (the start, or an earlier control);
        -1 when none was; None without verdicts (no control, or no validation rows)."""
        return _latest_better(self.control_summaries(arm), "control")

    def control_arms(self) -> list[str]:
        """The control arms this run has evaluated controls of: "sft" (SFT continued at the SFT rate) and "spin"
        (at SPIN's own rate), in that order."""
        return [arm for arm in CONTROL_ARMS if self.completed_controls(arm)]

    def final_comparisons(self) -> list[dict]:
        """Each control arm's comparison of SPIN's choice with the arm's own, made when its latest control was
        evaluated (its summary's `versus`: spin, control, winner, reasons, line), while it still stands: none before
        a control was evaluated, and none when SPIN's choice moved since (an iteration accepted whose control is
        not done yet)."""
        best = self.best_iteration()
        spin = "start" if best is None or best < 0 else f"iter {best}"
        found = []
        for arm in self.control_arms():
            controls = self.control_summaries(arm)
            versus = controls[-1].get("versus")
            if versus and versus["spin"] == spin:  # a choice on disk that stands names a model the run has
                path = self.control(len(controls) - 1, arm) / "summary.json"
                for field in ("winner", "against"):
                    self.check_choice(versus.get(field), path, f"versus.{field}")
                found.append(versus)
        return found

    def final_comparison(self) -> dict | None:
        """The comparison that decided the run's choice (see chosen_model): the winning control arm's, else the
        first arm's; None before a control was evaluated."""
        comparisons = self.final_comparisons()
        won = [v for v in comparisons if v["winner"] != v["spin"]]
        return max(won, key=_gain) if won else comparisons[0] if comparisons else None

    def models(self) -> list[str]:
        """The models this run has evaluated, as chosen_model names them: "start", "iter N" for each complete
        iteration, "control N" (or "control-ARM N", of another control arm) for each complete control."""
        controls = sorted((m[1], int(m[2])) for p in self.root.glob("control*-[0-9][0-9]*/summary.json")
                          if (m := re.fullmatch(r"(control(?:-[a-z]+)?)-(\d{2,4})", p.parent.name)))
        return ["start"] + [f"iter {t}" for t in range(self.completed())] + [f"{arm} {t}" for arm, t in controls]

    def check_choice(self, key: str | None, path: Path, field: str):
        """A choice recorded in `path` (its `field`: a model key, or None) refused by name unless it names a model of
        this run (models): a summary naming "control 99" is a damaged or forged file, not the run's choice."""
        if key is not None and key not in self.models():
            raise RunRecordError(path, field, "one of this run's models (" + ", ".join(self.models()) + ")", key)

    def chosen_model(self) -> str | None:
        """The one answer to "which model did this run choose?", among the start, the SPIN iterations and the
        controls, on the validation rows: "start", "iter N", "control N" (the control matched to iteration N) or
        "control-spin N" (the same at SPIN's rate); None when nothing was chosen (no validation rows, or nothing
        evaluated yet). SPIN's choice is the stop rule's (best_iteration); a control replaces it only when its arm's
        final comparison says it is better, and where both arms' controls are, the one with the larger gain on the
        deciding metric (eval.choose_by) over SPIN's choice."""
        versus = self.final_comparison()
        if versus:
            return versus["winner"]
        best = self.best_iteration()
        return None if best is None else "start" if best < 0 else f"iter {best}"

    def resolve_model(self, which: int | str | None = "best") -> int | str:
        """The one answer to "which model?" for the export, the app and the notebook: the iteration whose model
        `which` names, -1 for the starting model, or "control N" for the control matched to iteration N. `which`:
        an iteration number, "start", "control" (the control arm's own choice, best_control, else its last
        checkpoint), "control N", or "best" (and None, the default everywhere): the model chosen on the validation
        rows (chosen_model: the control when it won the final comparison, else the stop rule's iteration), or when
        none was chosen (no validation rows, nothing evaluated yet) the last trained iteration, else the start.
        Whether iteration N has an adapter is the caller's check (its message names what it was asked for)."""
        if isinstance(which, str) and which.startswith("control"):
            # "control 2", "control-2", "control-spin 2", or "control" / "control-spin": the arm's choice
            found = re.fullmatch(r"control(?:[- ](spin))?(?:[- ]?(\d+))?", which.strip())
            if not found:
                raise ValueError(f"{which!r} names no control: control N, control-spin N, control or control-spin")
            arm, number = found[1] or "sft", found[2]
            if number is None:
                best, trained = self.best_control(arm), self.trained_controls(arm)
                number = best if best is not None and best >= 0 else trained[-1] if trained else 0
            return control_name(int(number), arm)
        if which in (None, "best"):
            chosen = self.chosen_model()
            if chosen is not None and chosen.startswith("control"):
                return chosen
            best = self.best_iteration()
            trained = self.trained_iterations()
            return best if best is not None else trained[-1] if trained else -1
        return -1 if which == "start" else int(which)

    def model_label(self, n: int) -> str:
        """The model after iteration n (-1: the start) as menus and messages name it, with the stop rule's word on
        it: "iter 1 (chosen)", "start (chosen)", "iter 3 (rejected by the stop rule)", "iter 4 (not evaluated)"."""
        if isinstance(n, str):  # "control N"
            return f"{n} (chosen)" if n == self.chosen_model() else n
        name = "start" if n < 0 else f"iter {n}"
        if name == self.chosen_model():
            return f"{name} (chosen)"
        if n >= 0 and not self.is_complete(n):
            return f"{name} (not evaluated)"
        if n >= 0 and self.rejection(n):
            return f"{name} (rejected by the stop rule)"
        return name

    def rejection(self, n: int) -> str | None:
        """Why the stop rule rejected iteration n, as a sentence, or None when it did not (accepted, not judged)."""
        if isinstance(n, str):  # "control N": the stop rule judges iterations only
            return None
        s = (read_json(self.iteration(n) / "summary.json") or {}).get("selection") if n >= 0 else None
        if not s or s.get("accepted") is not False:
            return None
        best = self.best_iteration()
        chosen = "the starting model" if best is None or best < 0 else f"iteration {best}"
        return (f"the stop rule rejected iteration {n}: not better than {compared_with(s)} on the validation rows "
                f"({'; '.join(s.get('reasons') or ['no reasons recorded'])}); the model it chose is {chosen}")

    def rejected_in_a_row(self, before: int | None = None) -> int:
        """How many of the latest complete iterations (those before iteration `before`) the stop rule did not
        accept, in a row."""
        count = 0
        for s in reversed([s for s in self.summaries() if before is None or s["iteration"] < before]):
            if (s.get("selection") or {}).get("accepted") is not False:
                break
            count += 1
        return count

    def settings(self):
        """This run's config.yaml as a SpinConfig (for the stop rule's reading); None when it cannot be read."""
        from .config import ConfigError, load_config
        try:
            return load_config(self.config_path)
        except (ConfigError, OSError):
            return None

    def stopped(self, cfg) -> bool:
        """Whether the stop rule ends the run before its `iterations`: under train.stop_when=no_gain, its latest
        train.stop_patience complete iterations were not accepted. Read with the run's current settings (`cfg`),
        so raising stop_patience (or stop_when=never) lets a stopped run go on."""
        return self.completed() < cfg.iterations and cfg.train.stops_after(self.rejected_in_a_row())

    def stop_reason(self, cfg) -> str:
        """Where and why the stop rule ended the run (see `stopped`), for the messages that say so."""
        return (f"after iteration {self.completed() - 1} ({self.rejected_in_a_row()} not better in a row, "
                f"train.stop_patience={cfg.train.stop_patience})")

    def results_table(self, cfg=None) -> list[dict]:
        """One row for the starting model (with an SFT stage: "base", the model before it, then "sft", the start),
        one per complete iteration, one per complete control: test metrics (held-out), validation metrics prefixed
        val_, `steps` (optimizer steps since the start), train loss and accuracy, `best` on the chosen model
        (chosen_model), and, given the run's settings, `stopped` on the last iteration when the stop rule ends the
        run there."""
        rows = []
        chosen = self.chosen_model()
        base, start = read_json(self.root / "eval-base.json"), read_json(self.root / "eval-start.json")
        if base and self.sft_done():
            rows.append({"model": "base", **(base.get("metrics") or {}), **_prefixed(base.get("val")), "best": False})
        if start:
            rows.append({"model": "sft" if self.sft_done() else "start", **(start.get("metrics") or {}),
                         **_prefixed(start.get("val")), "best": chosen == "start"})
        steps = 0
        for s in self.summaries():  # (records of earlier versions, or made by hand, may lack train and its fields)
            train = s.get("train") or {}
            steps += train.get("steps") or 0
            row = {"model": f"iter {s['iteration']}", **(s.get("eval") or {}), **_prefixed(s.get("val"))}
            row.update(steps=steps, train_loss=train.get("loss"), train_accuracy=train.get("accuracy"),
                       best=chosen == f"iter {s['iteration']}", selection=s.get("selection"), stopped=False)
            rows.append(row)
        if cfg is not None and self.completed() and self.stopped(cfg):
            rows[-1]["stopped"] = True
        for arm in self.control_arms():  # (its training loss is SFT's, not SPIN's: not in the loss column)
            for s in self.control_summaries(arm):
                name = control_name(s["control"], arm)
                rows.append({"model": name, **(s.get("eval") or {}), **_prefixed(s.get("val")),
                             "steps": s.get("cumulative_steps"), "best": chosen == name})
        return rows

    # -- progress ---------------------------------------------------------------------------------------
    def progress(self, iteration: int | None, stage: str, total: int | None) -> "Progress":
        return Progress(self.root / "progress.json", iteration, stage, total)

    def read_progress(self) -> dict:
        return read_json(self.root / "progress.json", {})

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def iteration(self, t: int) -> Path:
        """The folder of iteration t (confined: never a link)."""
        return confined(self.root, self.root / f"iter-{t:02d}")

    def is_complete(self, t: int) -> bool:
        return (self.iteration(t) / "summary.json").exists()

    def completed(self) -> int:
        """Number of leading complete iterations."""
        t = 0
        while self.is_complete(t):
            t += 1
        return t

    def summaries(self) -> list[dict]:
        return [read_json(self.iteration(t) / "summary.json") for t in range(self.completed())]

    def trained_steps(self, t: int) -> int:
        """The optimizer steps iteration t took (its summary's train.steps): what the control arms match. A summary
        without them (a run written before they were recorded) is a named error, not a KeyError."""
        path = self.iteration(t) / "summary.json"
        steps = ((read_json(path, {}) or {}).get("train") or {}).get("steps")
        if steps is None:
            raise RunRecordError(path, "train.steps", f"iteration {t}'s optimizer steps (the control arm matches "
                                 "them)", "nothing")
        return steps

    def state(self) -> dict:
        return read_json(self.state_path, {})

    def set_state(self, **fields):
        try:
            state = self.state()
        except RunRecordError:  # for display only: a damaged state.json is replaced whole
            state = {}
        state = {**state, **fields, "updated": time.time()}
        atomic_write_json(self.state_path, state)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete what a killed writer left of an atomic write (NAME.PID-TID.tmp, atomic_write_text) in the run
        folder and its stage folders; called by the process that holds the lock, so no live writer owns one."""
        stale = [p for pattern in ("*.tmp", "*/*.tmp") for p in self.root.glob(pattern)
                 if p.is_file() and _TMP_NAME.search(p.name)]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def lock(self):
        """Hold the run directory for this process; refuse if another process holds it.

        An flock dies with its process, so a killed run never leaves the directory locked. The file is opened
        without truncating it and never through a symlink; the pid is written only once the lock is held, so a
        refused process leaves the holder's pid in place. A process started by a launcher that already took
        the lock for it (the app: SPIN_LITE_LOCK_FD names the inherited descriptor) adopts that lock.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        fd = _inherited_lock(path)
        if fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.lock_holder()
                raise RunLockedError(f"run directory {self.root} is in use by another process"
                                     + (f" (process {holder})" if holder else "")) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _LOCKED_ROOTS.add(Path(os.path.abspath(self.root)))
        return open(fd, "r+b", buffering=0)

    def is_locked(self) -> bool:
        try:
            fd = os.open(self.root / ".lock", os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # no lock file (or a symlink planted in its place: no run of ours holds that)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def lock_holder(self) -> int | None:
        """The pid written in the lock file by the process holding it, or None. The file is only a record, which
        anyone may have written: a pid is believed only when that process has the lock file open (Linux:
        /proc/PID/fd; elsewhere, when it is alive), and never when it names this process, so that a message never
        says to kill the process showing it (the app)."""
        path = self.root / ".lock"
        try:
            text = path.read_text().strip()
            lock = os.stat(path, follow_symlinks=False)
        except OSError:
            return None
        pid = int(text) if text.isdigit() and len(text) < 10 and int(text) > 1 else None
        if pid is None or pid == os.getpid():
            return None
        return pid if _holds_open(pid, (lock.st_dev, lock.st_ino)) else None


def _holds_open(pid: int, file: tuple[int, int]) -> bool:
    """Whether process `pid` has the file (st_dev, st_ino) open; without /proc, whether it is alive."""
    fds = Path(f"/proc/{pid}/fd")
    if not Path("/proc/self/fd").is_dir():
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    try:
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                there = os.stat(fd)
                if (there.st_dev, there.st_ino) == file:
                    return True
    except OSError:  # no such process, or another user's
        return False
    return False


def _inherited_lock(path: Path) -> int | None:
    """The descriptor of `path`'s lock inherited from the launcher (SPIN_LITE_LOCK_FD), already locked; None when
    there is none. The lock file pins the run directory the launcher checked: when `path` is no longer that file (the
    folder was replaced or a link planted since), the run is refused rather than run into another folder."""
    fd = os.environ.pop("SPIN_LITE_LOCK_FD", None)
    if fd is None or not fd.isdigit():
        return None
    try:
        held, there = os.fstat(int(fd)), os.stat(path, follow_symlinks=False)
        if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino):
            raise FileNotFoundError
        fcntl.flock(int(fd), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the same open file: already ours
        os.set_inheritable(int(fd), False)  # ours alone now: a child process must not keep the run locked
    except OSError:
        raise RunLockedError(f"run directory {path.parent} is not the folder whose lock the launcher took (it was "
                             "replaced or moved after the launch was checked); launch the run again") from None
    return int(fd)


def _latest_better(summaries: list[dict], key: str) -> int | None:
    """The `key` number of the latest summary whose verdict found it better than the best before it; -1 when
    verdicts exist but none did (the start is the best); None without verdicts."""
    best = None
    for s in summaries:
        if s.get("selection") is not None:
            best = s[key] if found_better(s["selection"]) else (-1 if best is None else best)
    return best


def found_better(selection: dict) -> bool:
    """Whether a stop-rule verdict (summary.json's `selection`) found the model better than the one it was compared
    with, and so chosen. The paired rule records `better` apart from `accepted` (not worse: the run goes on); a
    verdict of the aggregate rule, or of a run made before the paired one, has only `accepted`, which meant both."""
    return selection.get("better", selection["accepted"])


def compared_with(selection: dict) -> str:
    """The model a verdict compared with, as it names it ("the starting model", "iteration 2"); a verdict written by
    hand or by an early version may not say."""
    return selection.get("compared_with") or "the model before it"


def _prefixed(metrics: dict | None) -> dict:
    return {f"val_{k}": v for k, v in (metrics or {}).items()}


class Progress:
    """Progress of one running stage as data: progress.json holds {iteration, stage, done, total, rate (units a
    second), updated}. Call it with the units done so far; it writes at most twice a second, and always at the end."""

    def __init__(self, path: Path, iteration: int | None, stage: str, total: int | None):
        self.path, self.iteration, self.stage, self.total = path, iteration, stage, total
        self.began = self.written = time.time()
        self(0)

    def __call__(self, done: int, total: int | None = None):
        self.total = total if total is not None else self.total
        now = time.time()
        if done and now - self.written < 0.5 and done != self.total:
            return
        self.written = now
        rate = done / (now - self.began) if done and now > self.began else None
        atomic_write_json(self.path, {"iteration": self.iteration, "stage": self.stage, "done": done,
                                      "total": self.total, "rate": rate, "updated": now})


class RunLockedError(RuntimeError):
    pass


def fault_point(name: str, count: int):
    """Test hook: SPIN_LITE_KILL_AT=name:count kills this process with SIGKILL there, as a crash would."""
    if os.environ.get("SPIN_LITE_KILL_AT") == f"{name}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
