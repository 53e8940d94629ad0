"""Command line: `spin-lite run CONFIG.yaml [key=value ...]`, one stage at a time, table, export, app.

    spin-lite run examples/configs/demo.yaml                 # all iterations; run again to continue
    spin-lite run examples/configs/demo.yaml train.beta=0.2 iterations=3
    spin-lite run - < config.yaml                            # the config on standard input (the app's launches)
    spin-lite generate runs/demo                             # one stage of the next iteration
    spin-lite train runs/demo
    spin-lite evaluate runs/demo
    spin-lite table runs/demo
    spin-lite estimate examples/configs/demo.yaml            # each stage's time on this machine, before a run
    spin-lite sft examples/configs/experiment_sft.yaml      # LoRA SFT: a starting model (model.adapter) for SPIN
    spin-lite export runs/demo --out exports/demo --merged     # the chosen model (stop rule) as one model
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from .config import STDIN, ConfigError, describe_settings, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spin-lite", description="SPIN self-play fine-tuning with one LoRA adapter per iteration.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or continue) all iterations of a config",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Run SPIN iterations. Running the same command again continues the run "
                                     "where it stopped.",
                         epilog="settings (in the YAML file, or as key=value overrides):\n" + describe_settings())
    run.add_argument("config", nargs="?", help="YAML config file, always first (omit to start from the defaults; "
                                               "-: read it from standard input)")
    run.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.beta=0.2 iterations=3")
    for stage, text in (("generate", "generate and score the next iteration's pairs"),
                        ("train", "train the next iteration's adapter on its scored pairs"),
                        ("evaluate", "evaluate the next iteration's adapter and complete the iteration")):
        p = sub.add_parser(stage, help=text, description=text.capitalize() + ", in an existing run directory.")
        p.add_argument("run_dir", help="run directory made by `spin-lite run`")
    estimate = sub.add_parser("estimate", help="estimate each stage's time on this machine before a run",
                              description="Load the model and data of a config, time one unit of each stage's work "
                                          "here, and print each stage's estimated time (spin_lite.estimate).")
    estimate.add_argument("config", nargs="?", help="YAML config file (omit to start from the defaults)")
    estimate.add_argument("overrides", nargs="*", help="key=value settings, e.g. data.max_examples=200")
    table = sub.add_parser("table", help="print the results table of a run directory")
    table.add_argument("run_dir")
    sft = sub.add_parser("sft", help="supervised fine-tuning of a LoRA adapter: the starting model for SPIN",
                         description="LoRA SFT on the same config and data as a run; writes RUN_DIR/adapter, usable as "
                                     "a SPIN run's model.adapter. With model.adapter set, continues that adapter.")
    sft.add_argument("config", nargs="?", help="YAML config file (omit to start from the defaults)")
    sft.add_argument("overrides", nargs="*", help="key=value settings, e.g. run_dir=runs/sft train.epochs=3")
    sft.add_argument("--steps", type=int, default=None, help="optimizer steps (default: train.epochs passes)")
    from .export import add_arguments as export_arguments
    export_arguments(sub.add_parser(
        "export", help="export an iteration's adapter, or the merged model (--merged), optionally to the Hub",
        description="Export the model after an iteration (by default the one the stop rule chose on the validation "
                    "rows; it says which): its LoRA adapter (PEFT layout), or with --merged the base with the "
                    "adapter(s) merged in, in 16/32 bits; --push-to-hub also uploads it."))
    sub.add_parser("app", add_help=False, help="open the web app (spin_lite.app: spin-lite app --help for its options)")
    return parser


# The commands that read an existing run directory (its config.yaml).
RUN_DIR_COMMANDS = ("table", "generate", "train", "evaluate")

# A `key=value` setting: a dotted name, then "=" (a path such as cfg/lr=5e-4.yaml is not one).
SETTING = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def config_and_overrides(first: str | None, rest: list[str]) -> tuple[str | None, list[str]]:
    """The config file is the first argument and the overrides come after it. Only a first argument that is
    a setting (SETTING), names no existing file and does not end in .yaml/.yml starts from the defaults, with
    every argument an override."""
    if first is not None and SETTING.match(first) and not os.path.lexists(first) \
            and not first.endswith((".yaml", ".yml")):
        return None, [first, *rest]
    return first, rest


def load_run_config(first: str | None, rest: list[str]):
    """The config of `spin-lite run|estimate|sft FIRST REST...`: a file and overrides, or with FIRST = "-" the YAML on
    standard input. The app launches its runs that way: the config it checked reaches the run through a pipe that
    nothing in the workspace can swap, where a file in the run directory could be replaced in the seconds before
    the run reads it."""
    if first != STDIN:
        return load_config(*config_and_overrides(first, rest))
    import yaml

    from .config import SpinConfig, apply_overrides
    try:
        data = yaml.safe_load(sys.stdin.read()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"the config on standard input is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    return SpinConfig.from_dict(apply_overrides(data, rest))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from . import quiet
    quiet.apply()  # library noise a user cannot act on (spin_lite.quiet), for the CLI and the app alike
    if argv[:1] == ["app"]:  # the app parses its own options (--host, --port, --share, --auth, --workspace)
        try:
            import gradio  # noqa: F401
        except ImportError:
            print('error: the web app needs Gradio: pip install "spin-lite[app]"', file=sys.stderr)
            return 2
        from .app import main as app_main
        return app_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .model import ModelError
    from .records import RunRecordError
    from .report import format_table
    from .run import RunError, SpinRun
    from .train import TrainingDiverged
    from .state import LinkError, RunDir, RunLockedError

    try:
        run_dir = RunDir(args.run_dir) if args.command in RUN_DIR_COMMANDS else None
        if run_dir is not None and not run_dir.config_path.exists():
            raise RunError(f"{args.run_dir} is not a run directory (no config.yaml); start one with spin-lite run")
        if args.command == "table":
            print(format_table(run_dir, run_dir.settings()))
        elif args.command == "export":
            from .export import main as export_main
            return export_main(args)
        elif args.command == "run":
            SpinRun(load_run_config(args.config, args.overrides)).run()
        elif args.command == "estimate":
            from .estimate import estimate_run, format_estimate
            print(format_estimate(*estimate_run(load_run_config(args.config, args.overrides))))
        elif args.command == "sft":
            from .sft import run_sft
            run_sft(load_run_config(args.config, args.overrides), steps=args.steps)
        else:
            cfg = load_config(run_dir.config_path, [f"run_dir={args.run_dir}"])
            t = run_dir.completed()
            if t >= cfg.iterations:
                raise RunError(f"all {cfg.iterations} iterations of {args.run_dir} are complete")
            if run_dir.stopped(cfg):
                raise RunError(f"the stop rule ended {args.run_dir} {run_dir.stop_reason(cfg)}; to go on, run "
                               f"`spin-lite run {run_dir.config_path} train.stop_patience=N` with a higher N "
                               "(or train.stop_when=never)")
            SpinRun(cfg).prepare().iteration(t, only=args.command)
    except (ConfigError, DataError, LinkError, ModelError, RunError, RunLockedError, RunRecordError,
            TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
