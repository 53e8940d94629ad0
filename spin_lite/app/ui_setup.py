"""The Setup tab: a preset, the settings that matter first (form.FIRST) with the model's check beside the model and
the data's upload and preview under the data, Start and the time estimate, every other setting under "Advanced"
by topic (form.TOPICS), and the config as YAML and as a CLI command, saved to or loaded from the workspace.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from . import form
from . import preview as preview_h
from ..config import ConfigError, SpinConfig
from ..model import ModelError
from .workspace import error_md, save_upload

# The labels of the settings shown first (form.FIRST); every other one is under "Advanced", by topic.
LABELS = {"model.name": "Model: the embedded SmolLM2-135M-Instruct, a Hub id, or a folder here",
          "data.path": "Data: sample:demo (bundled), an uploaded file, a file here, or a Hub dataset id",
          "iterations": "SPIN iterations (at most)", "train.learning_rate": "SPIN learning rate",
          "train.lr_ratio_to_sft": "or: SPIN's rate as a fraction of the SFT rate", "sft.enabled": "SFT stage first",
          "sft.control": "SFT-continued control", "train.stop_patience": "Stop patience (rejected iterations in a row)",
          "run_dir": "Run directory (a new folder in the workspace)"}


def setting_input(s: form.Setting, value, label: str | None = None, scale: int | None = None):
    """The form input of one config setting: its name (or `label`) as label, its documentation and default as info."""
    shown = "none" if s.default is None else form.yaml_value(s.default)
    info = f"{s.key}: {s.help} Default: {shown}." if label else f"{s.help} Default: {shown}."
    common = dict(label=label or s.key, info=info, elem_id="cfg-" + s.key.replace(".", "-"), min_width=280, scale=scale)
    if s.choices:
        return gr.Dropdown(s.choices, value=value, **common)
    if s.kind == "bool":  # in a column of its own: a checkbox alone in a row gets too narrow for its label
        with gr.Column(min_width=280):
            return gr.Checkbox(value=value, **common)
    if s.kind in ("int", "float"):  # no precision: Gradio's rounding would fail on a value of the wrong type sent
        return gr.Number(value=value, **common)  # through the API; the config's check names it instead
    return gr.Textbox(value=value, max_lines=1, **common)


def first_screen() -> tuple[str | None, SpinConfig, str]:
    """The preset the page opens on (form.recommended_preset for this machine), its config, and a note; the
    config's defaults if the preset's file cannot be read (a checkout without its links, say)."""
    name = form.recommended_preset(form.gpu_memory_gib())
    try:
        return name, form.preset_config(name), ""
    except ConfigError as e:
        return None, SpinConfig(), f"The preset {name!r} could not be read ({e}); the form shows the defaults."


def setup_tab(ws: Path, demo: gr.Blocks) -> SimpleNamespace:
    """Setup: a preset, the settings that matter first (model, data, iterations, learning rate, SFT, stop rule)
    and Start; every other setting under "Advanced", by topic (form.TOPICS)."""
    specs = form.settings()
    preset_name, cfg, note = first_screen()
    values = dict(zip([s.key for s in specs], form.form_values(cfg)))
    with gr.Tab("Setup", id="setup", elem_id="tab-setup"):
        with gr.Row():
            with gr.Column(scale=3):
                preset = gr.Dropdown(list(form.PRESETS), value=preset_name, label="Preset: fills every setting "
                                     "(the one recommended for this machine is chosen)", elem_id="preset")
                gr.Markdown(note or "Check the settings below and start; every other setting is under *Advanced*.")
                field, first = first_settings(specs, values)
                problems = gr.Markdown(elem_id="config-problems")
                with gr.Row():
                    start_btn = gr.Button("Start this run", variant="primary", elem_id="start-run", scale=3)
                    estimate_btn = gr.Button("Estimate the time", elem_id="estimate-time", scale=1)
                start_error = gr.Markdown(elem_id="setup-error")  # a refusal, under the button
                start_msg = gr.Markdown(elem_id="setup-msg")  # the last launch
                estimate = gr.Markdown(elem_id="time-estimate")
                with gr.Accordion("Advanced settings, by topic", open=False, elem_id="advanced"):
                    for title, tid, _ in form.TOPICS:
                        with gr.Accordion(title, open=False, elem_id=f"advanced-{tid}"), gr.Row():
                            for s in specs:
                                if form.topic(s.key) == tid:
                                    field[s.key] = setting_input(s, values[s.key])
            with gr.Column(scale=2):
                files = config_files_section()
    fields = [field[s.key] for s in specs]  # settings() order: the order form.config_from_form reads
    wire_setup(ws, demo, fields, first, files, problems, start_error)
    wire_preset(preset, fields, files, problems)

    def estimate_time(*values):
        try:
            return preview_h.estimate_time(ws, form.config_from_form(list(values)))
        except Exception as e:
            return error_md(e)

    estimate_btn.click(estimate_time, fields, estimate, api_name="estimate")
    return SimpleNamespace(fields=fields, start_btn=start_btn, start_msg=start_msg, start_error=start_error,
                           problems=problems)


def first_settings(specs: list, values: dict) -> tuple[dict, SimpleNamespace]:
    """The settings of form.FIRST, the model's check beside the model and the data's upload and preview under the
    data; returns {key: input} and those parts."""
    spec = {s.key: s for s in specs}
    field = {}
    with gr.Row(equal_height=False):
        field["model.name"] = setting_input(spec["model.name"], values["model.name"], LABELS["model.name"], scale=3)
        model_msg = gr.Markdown(elem_id="model-check", min_width=200)  # scale 1: beside the model
    field["data.path"] = setting_input(spec["data.path"], values["data.path"], LABELS["data.path"])
    data = data_section()
    for row in (["iterations", "train.stop_patience"], ["train.learning_rate", "train.lr_ratio_to_sft"],
                ["sft.enabled", "sft.control"], ["run_dir"]):
        with gr.Row():
            for key in row:
                field[key] = setting_input(spec[key], values[key], LABELS[key])
    assert set(field) == set(form.FIRST)
    return field, SimpleNamespace(model=field["model.name"], model_msg=model_msg, data_path=field["data.path"],
                                  data=data)


def data_section() -> SimpleNamespace:
    upload = gr.File(label="Upload a data file (.jsonl, .json, .csv, .parquet): it is copied to the workspace's "
                           "uploads/ folder", file_types=[".jsonl", ".json", ".csv", ".parquet"],
                     elem_id="data-upload", height=100)
    preview_btn = gr.Button("Preview the first rows as the model sees them", elem_id="preview-data", size="sm")
    msg = gr.Markdown(elem_id="preview-msg")
    # What the model sees and what is wrong first; the file's own columns last, each value cut (PREVIEW_RAW_CHARS)
    table = gr.Dataframe(empty_preview(), wrap=True,
                         label="Data preview: the prompt with the chat template applied, the response, token counts, "
                               "any problem, then the file's own columns", elem_id="preview-table", interactive=False,
                         column_widths=["5%", "14%", "30%", "22%", "6%", "6%", "17%"])
    return SimpleNamespace(upload=upload, preview_btn=preview_btn, msg=msg, table=table)


def empty_preview() -> pd.DataFrame:
    return pd.DataFrame(columns=preview_h.PREVIEW_COLUMNS)


def config_files_section() -> SimpleNamespace:
    yaml_code = gr.Code(label="Config (YAML)", language="yaml", interactive=False, elem_id="yaml-preview")
    cli_code = gr.Code(label="The same run from the command line", language="shell", interactive=False,
                       elem_id="cli-preview")
    with gr.Row():
        path = gr.Textbox("configs/spin.yaml", label="Config file (in the workspace)", elem_id="config-path", scale=3)
        save_btn = gr.Button("Save config", elem_id="save-config", scale=1)
        load_btn = gr.Button("Load config", elem_id="load-config", scale=1)
    msg = gr.Markdown(elem_id="config-file-msg")
    upload = gr.File(label="Load a config file from this computer", file_types=[".yaml", ".yml"], height=100,
                     elem_id="config-upload")
    download = gr.File(label="Saved config", interactive=False)
    return SimpleNamespace(yaml=yaml_code, cli=cli_code, path=path, save_btn=save_btn, load_btn=load_btn,
                           msg=msg, upload=upload, download=download)


def wire_preset(preset, fields: list, files: SimpleNamespace, problems):
    """A preset fills the whole form, and names its file for Save (so it can be kept in the workspace's configs/)."""
    def apply(name):
        try:
            cfg = form.preset_config(name)
        except Exception as e:
            return {problems: error_md(e)}
        file = form.PRESETS[name][0]
        return {files.path: f"configs/{Path(file).stem}.yaml", files.msg: f"preset {name}: {file}",
                **dict(zip(fields, form.form_values(cfg)))}

    preset.input(apply, preset, [problems, files.path, files.msg, *fields])


def wire_setup(ws: Path, demo, fields: list, first: SimpleNamespace, files: SimpleNamespace, problems, start_error):
    data = first.data

    def show_config(*values):
        """The config as YAML and as a command, or what is wrong with it; a changed form clears Start's refusal
        (about the values before), so an error shows once, and never after it was mended."""
        try:
            cfg = form.config_from_form(list(values))
        except Exception as e:
            return {problems: error_md(e), start_error: ""}
        return {files.yaml: cfg.to_yaml(), files.cli: form.cli_command(ws, cfg), problems: "", start_error: ""}

    config_view = [files.yaml, files.cli, problems, start_error]
    gr.on([f.change for f in fields], show_config, fields, config_view, trigger_mode="always_last",
          show_progress="hidden", api_name="show_config")
    demo.load(show_config, fields, config_view)

    def check_model(*values):  # beside the model field, as the CLI says it (preflight)
        try:
            preview_h.check_model(ws, form.config_from_form(list(values)))
            return ""
        except Exception as e:
            return error_md(e)

    gr.on([first.model.submit, first.model.blur], check_model, fields, first.model_msg, trigger_mode="always_last")

    def preview(*values):
        try:
            rows, message = preview_h.preview_data(ws, form.config_from_form(list(values)))
            return {data.table: pd.DataFrame(rows, columns=preview_h.PREVIEW_COLUMNS), data.msg: message,
                    first.model_msg: ""}
        except ModelError as e:  # the model is checked first (preview_data): its message goes beside the model
            return {data.table: empty_preview(), data.msg: "No preview: the model above could not be loaded.",
                    first.model_msg: error_md(e)}
        except Exception as e:
            return {data.table: empty_preview(), data.msg: error_md(e)}

    def uploaded(file):
        try:
            return {first.data_path: save_upload(ws, file), data.msg: ""} if file else {data.msg: ""}
        except Exception as e:
            return {data.msg: error_md(e)}

    shown = [data.table, data.msg, first.model_msg]
    data.preview_btn.click(preview, fields, shown, api_name="preview")
    data.upload.upload(uploaded, data.upload, [first.data_path, data.msg], api_name="upload_data"
                       ).then(preview, fields, shown)
    wire_config_files(ws, fields, files)


def wire_config_files(ws: Path, fields: list, files: SimpleNamespace):
    def save(path, *values):
        try:
            target = form.save_config(ws, form.config_from_form(list(values)), path)
            copy = Path(tempfile.mkdtemp(prefix="spin-config-")) / target.name  # the download's own copy
            copy.write_text(target.read_text())
            return {files.msg: f"saved {target.relative_to(ws)}", files.download: str(copy)}
        except Exception as e:
            return {files.msg: error_md(e), files.download: None}

    def load(path):
        try:
            return {files.msg: f"loaded {path}", **dict(zip(fields, form.form_values(form.open_config(ws, path))))}
        except Exception as e:
            return {files.msg: error_md(e)}

    def load_uploaded(file):
        try:
            return load(save_upload(ws, file)) if file else {}
        except Exception as e:
            return {files.msg: error_md(e)}

    files.save_btn.click(save, [files.path, *fields], [files.msg, files.download], api_name="save")
    files.load_btn.click(load, files.path, [files.msg, *fields], api_name="load")
    files.upload.upload(load_uploaded, files.upload, [files.msg, *fields], api_name="upload_config")
