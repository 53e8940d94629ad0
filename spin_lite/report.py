"""The text a run ends with, and what `spin-lite table` prints: the results table (one row per model, the columns
that have a value), the stop rule's notes, the chosen model (or why none was chosen), the line that says whether SPIN
or SFT continued won on the validation rows (versus_line, written by spin_lite.control), and last the next steps as
commands, so that a run's last line is what to do now."""
from __future__ import annotations

from .evaluate import VAL_COLUMNS
from .state import RunDir, compared_with, control_key, found_better


# (key, title, format) of the columns `spin-lite table` prints; columns without any value are left out.
TABLE_COLUMNS = [("model", "model", "{}"), ("steps", "steps", "{}"), ("train_loss", "train loss", "{:.4f}"),
                 *((f"val_{key}", VAL_COLUMNS[key], "{:.3f}" if key == "logp_per_token" else "{:.2f}")
                   for key in VAL_COLUMNS),  # every validation metric the stop rule reads, as its reasons name it
                 ("margin_accuracy", "test margin acc", "{:.2f}"), ("logp_per_token", "test logp/tok", "{:.3f}"),
                 ("ended_rate", "test ended", "{:.2f}"), ("repetition_rate", "test repetitive", "{:.2f}"),
                 ("match_rate", "test match", "{:.2f}"), ("task_accuracy", "test task acc", "{:.2f}"),
                 ("sample_tokens", "answer tokens", "{:.1f}")]


def format_table(run_dir: RunDir, cfg=None) -> str:
    """`spin-lite table`: the results table, the stop rule's verdicts, and the chosen iteration; `cfg` (the
    run's settings) says whether the stop rule ended the run."""
    rows = run_dir.results_table(cfg)
    columns = [c for c in TABLE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    cells = [[c[1] for c in columns] + ["chosen"]] + [
        [c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in columns] + ["best" if r.get("best") else ""]
        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    # rejected (worse: counts toward the stop), or accepted without a clear gain (the run went on; not chosen)
    notes = [f"{r['model']}: not {'' if r['selection']['accepted'] is False else 'clearly '}better than "
             f"{compared_with(r['selection'])} on validation (" + "; ".join(r["selection"].get("reasons") or []) + ")"
             + (", run stopped" if r.get("stopped") else "")
             for r in rows if r.get("selection") and not found_better(r["selection"])]
    if any(r["model"].startswith("control ") for r in rows):
        notes.append("control N: SFT continued, the starting model trained by SFT on the same rows for as many "
                     "optimizer steps as iterations 0..N (steps: since the start)")
    if any(r["model"].startswith("control-spin") for r in rows):
        notes.append("control-spin N: the same at SPIN's own learning rate, to tell SPIN's objective from its step "
                     "size")
    chosen = run_dir.chosen_model()
    decided = {"task_accuracy": "val task acc", "match_rate": "val match"}.get(
        cfg.eval.deciding_metric if cfg is not None else "", "val logp/tok")
    chosen = (nothing_chosen(run_dir, cfg) if chosen is None else "chosen on the validation rows: "
              + ("the starting model" if chosen == "start" else f"iteration {chosen.split()[-1]}"
                 if chosen.startswith("iter") else f"SFT continued, {chosen}") + f" (decided by {decided})")
    # which won, SPIN or SFT continued, for each control arm, the deciding arm's last; then what to do now, last
    versus = run_dir.final_comparisons()
    decisive = run_dir.final_comparison()
    lines_versus = [v["line"] for v in versus if v != decisive] + ([decisive["line"]] if decisive else [])
    return (f"SPIN results for {run_dir.root} (test rows unless marked val)\n"
            + "\n".join(lines + notes + [chosen] + lines_versus + next_steps(run_dir, cfg)))


def nothing_chosen(run_dir: RunDir, cfg=None) -> str:
    """Why the run has no chosen model yet (RunDir.chosen_model is None), as the table says it: evaluation off, no
    validation rows, or validation rows but no iteration judged on them yet."""
    start = run_dir.evaluation("start")
    rows = len(start.get("val_rows") or {})
    if cfg is not None and not cfg.eval.enabled:
        return ("nothing chosen: evaluation is off (eval.enabled: false), so no model was judged on the validation "
                "rows")
    if start.get("val"):
        measured = f"the starting model was evaluated on {rows} validation rows" if rows else \
            "the starting model was evaluated on the validation rows"
        if not run_dir.completed():
            return f"nothing chosen yet: no iteration is complete ({measured})"
        return f"nothing chosen: no complete iteration was judged on the validation rows ({measured})"
    if start:
        return ("no validation rows (data.val_size: 0, and no data.val_path): nothing chosen, since choosing reads "
                "only validation rows")
    return "nothing chosen yet: the starting model is not evaluated yet"


def next_steps(run_dir: RunDir, cfg=None) -> list[str]:
    """The table's last lines: what to do now, as commands. The chosen model's export, or why there is none;
    with the run's settings (`cfg`), how to go on: continue an unfinished run, or let a run the stop rule ended
    go on with a higher train.stop_patience."""
    root, config, best = run_dir.root, run_dir.config_path, run_dir.best_iteration()
    n = run_dir.resolve_model("best")
    if isinstance(n, str):  # "control N": SFT continued won; its adapter stands alone in either mode
        c, arm = control_key(n)
        name = "control" if arm == "sft" else f"control-{arm}"
        steps = [still_learning(run_dir, n, cfg),
                 f"next: export the chosen model: spin-lite export {root} --iteration {name}-{c} --out "
                 f"exports/{root.name}-{name}-{c:02d}  (the adapter; --merged or --gguf q8_0: one model file)"]
    elif n >= 0:
        why = "the chosen model" if best is not None else "the last iteration (nothing chosen: see above)"
        merged_only = cfg is not None and cfg.mode == "merge" and (n > 0 or run_dir.start_adapter(cfg))
        steps = [f"next: export {why}: spin-lite export {root} --iteration {n} --out exports/{root.name}-iter-{n:02d}"
                 + (" --merged" if merged_only else "  (the adapter; --merged or --gguf q8_0: one model file)")]
    elif best is not None:  # the starting model beat every iteration
        steps = [starting_model_chosen(run_dir, cfg)]
    else:
        steps = []
    if cfg is None:
        return steps
    said = "or" if any(s.startswith("next:") for s in steps) else "next:"  # (an export said first: "or" below)
    if run_dir.stopped(cfg):
        steps.append(f"{said} let SPIN go on past the rejected iteration(s), with a higher "
                     f"patience: spin-lite run {config} train.stop_patience={run_dir.rejected_in_a_row() + 1}")
    elif run_dir.completed() < cfg.iterations:
        steps.append(f"{said} continue the run ({run_dir.completed()} of {cfg.iterations} "
                     f"iterations done): spin-lite run {config}")
    return steps


def starting_model_chosen(run_dir: RunDir, cfg=None) -> str:
    """What to do when no iteration beat the starting model: export it when this run made it (the SFT stage's
    adapter), keep using it when it is the user's own (model.adapter), or use the base, which holds nothing trained."""
    start = run_dir.start_adapter(cfg) if cfg is not None else None
    root = run_dir.root
    if start is None:
        return "no iteration was better than the starting model, the base itself, so there is nothing trained to export"
    export = f"spin-lite export {root} --iteration start --out exports/{root.name}-start"
    if cfg.sft.enabled:  # this run's own SFT stage made it: it is the run's result
        return (f"next: export the chosen model, the SFT stage's (no iteration was better): {export}  (the adapter; "
                "--merged or --gguf q8_0: one model file)")
    return (f"no iteration was better than the starting model, the base with your starting adapter {start}: keep "
            f"using it (or export it as one model: {export} --merged)")


def still_learning(run_dir: RunDir, control: str, cfg=None) -> str:
    """Why SFT continued won, when it did: the control's gain over the starting model says the starting model is
    still learning the training rows, and what to do about it (a longer SFT stage, in a new run directory: a run
    refuses changed stage settings)."""
    gain = _gap(run_dir.evaluation(control).get("val"), run_dir.evaluation("start").get("val"))
    advice = (f"why: SFT continued raised the starting model by {gain}: it is still learning these rows, and more "
              "SFT is the cheaper way on. SPIN is meant to start where more SFT no longer helps (the paper's SFT "
              "model gained nothing from another epoch)")
    if cfg is None:
        return advice
    if cfg.sft.enabled:
        setting, twice = ("steps", 2 * cfg.sft.steps) if cfg.sft.steps else ("epochs", 2 * cfg.sft.epochs)
        return (f"{advice}: train the SFT stage longer and compare again: spin-lite run {run_dir.config_path} "
                f"sft.{setting}={twice} run_dir={run_dir.root}-{setting}{twice}")
    if cfg.model.adapter:
        return f"{advice}: train your SFT adapter ({cfg.model.adapter}) longer and compare again"
    return f"{advice}: start SPIN from an SFT model (sft.enabled=true: an SFT stage first) and compare again"


def versus_line(winner: str, loser: str | None, verdict, winner_val: dict | None, loser_val: dict | None,
                steps: dict[str, int]) -> str:
    """The run's last line: which won on the validation rows, SPIN or SFT continued, by how much, and which metric
    decided (eval.choose_by)."""
    line = _versus_line(winner, loser, verdict, winner_val, loser_val, steps)
    decided = getattr(verdict, "decided_by", None)
    return line + (f" (decided by {VAL_COLUMNS[decided]})" if decided in VAL_COLUMNS and verdict.rule == "paired" else "")


def _versus_line(winner: str, loser: str | None, verdict, winner_val: dict | None, loser_val: dict | None,
                 steps: dict[str, int]) -> str:
    def described(key):
        if key == "start":
            return "the starting model"
        if key.startswith("iter"):
            return f"SPIN iteration {model_number(key)} ({steps[key]} steps)"
        rate = ", at SPIN's rate" if key.startswith("control-") else ""
        return f"SFT continued ({key}, {steps[key]} steps{rate})"
    if loser is None:
        return "Neither SPIN nor SFT continued beat the starting model on your validation rows: it stays chosen."
    gap = _gap(winner_val, loser_val)
    if winner.startswith("control"):
        rival = "the starting model (no SPIN iteration beat it)" if loser == "start" else described(loser)
        return (f"SFT continued beat every SPIN iteration on your validation rows: {winner} ({steps[winner]} steps) "
                f"over {rival}, by {gap}.")
    if winner == "start":
        return (f"Neither SPIN nor SFT continued beat the starting model on your validation rows ({described(loser)}: "
                f"{_gap(loser_val, winner_val)}): it stays chosen.")
    if verdict is not None and verdict.better:
        return f"{described(winner)} beat {described(loser)} by {gap} on your validation rows; it is chosen."
    return (f"{described(winner)} stays chosen: {described(loser)} did not beat it on your validation rows, nor did "
            f"it clearly beat that one ({gap}: within the noise of the rows).")


def _gap(new: dict | None, old: dict | None) -> str:
    """`new` - `old` on the validation metrics a reader weighs: logp/token, and the task metric where there is one."""
    new, old = new or {}, old or {}
    keys = [k for k in ("logp_per_token", "task_accuracy", "match_rate")
            if new.get(k) is not None and old.get(k) is not None]
    parts = [f"{new[k] - old[k]:+{'.3f' if k == 'logp_per_token' else '.2f'}} {VAL_COLUMNS[k]}" for k in keys]
    return ", ".join(parts) or "no validation metrics"


def model_number(key: str) -> int:
    """N of "iter N" or "control N"."""
    return int(key.split()[-1])
