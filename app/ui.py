"""The Gradio page: Train (form, presets, launch, live progress, queue, cancel), Runs, Compare.

Every event handler is a thin function over runs.py / submit.py / launcher.py / compare.py, and each one
that a script may want has an api_name, so gradio_client drives the same code paths as the page.
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path

import gradio as gr

from flatlora_diffusion.config import ConfigError

from . import chart, compare, compare_table, downloads, evaluations, form, manage, plan
from .eval_job import EvaluationRefused
from .launcher import Launcher
from .runs import ACTIVE, TERMINAL, Run, format_eta, get_run, group_runs, list_runs, safe_name
from .submit import SubmitError, caption_suffix, prepare_runs, split_uploads


PRESET_DIR = ".presets"
_STATE_COLOURS = {"running": "#2b7be4", "queued": "#b08900", "completed": "#2e9d4f", "failed": "#d03737",
                  "cancelled": "#555"}

# --- small views ----------------------------------------------------------------------------------------
def progress_html(runs: list[Run], launcher: Launcher) -> str:
    if not runs:
        return "<div>No run yet: fill in the form and press <b>Launch</b>.</div>"
    parts = []
    for run in runs:
        st = run.status()
        state = str(st.get("state") or "unknown")
        step, total = int(st.get("step") or 0), int(st.get("total") or 0)
        pct = 100.0 * step / total if total else 0.0
        bits = [f"step {step}/{total}" if total else f"step {step}", f"{pct:.0f}%"]
        if state == "running":
            bits.append(f"ETA {format_eta(st.get('eta_seconds'))}")
            its = [m.get("it_per_s") for m in run.metrics()[-1:]]
            if its and isinstance(its[0], (int, float)):
                bits.append(f"{its[0]:.2f} it/s")
        elif state == "queued":
            pos = launcher.position(run.name)
            bits.append(f"waiting, place {pos} in the queue" if pos else "waiting")
        message = html.escape(str(st.get("message") or ""))
        parts.append(
            f"<div style='margin:0 0 10px 0' data-run='{html.escape(run.name)}' data-state='{state}'>"
            f"<b>{html.escape(compare.run_label(run))}</b> <span style='padding:1px 6px;border-radius:4px;"
            f"color:white;background:{_STATE_COLOURS.get(state, '#777')}'>{state}</span>"
            f"<br><progress value='{step}' max='{max(total, 1)}' style='width:100%;height:14px'></progress>"
            f"<br>{' · '.join(bits)} <span style='opacity:0.7'>{message}</span></div>"
        )
    return "".join(parts)


def queue_markdown(launcher: Launcher) -> str:
    snap = launcher.snapshot()
    lines = []
    if snap["running"]:
        lines.append(f"**Training now:** {snap['running']}")
    if snap["queued"]:
        lines.append("**Waiting:** " + ", ".join(f"{i}. {n}" for i, n in enumerate(snap["queued"], 1)))
    evals = launcher.eval_snapshot()
    if evals["evaluating"]:
        lines.append(f"**Evaluating now:** {evals['evaluating']}")
    if evals["waiting"]:
        lines.append("**Evaluations waiting:** " + ", ".join(f"{i}. {n}" for i, n in enumerate(evals["waiting"], 1)))
    return "  \n".join(lines) or "The queue is empty."


def newest_images(runs: list[Run]) -> list[tuple[str, str]]:
    out = []
    for run in runs:
        steps = run.sample_steps()
        if not steps:
            continue
        prompts = run.prompts()
        for (p, seed), path in run.samples_at(steps[-1]).items():
            out.append((str(path), f"{run.name} · step {steps[-1]} · {prompts.get(p, p)} · seed {seed}"))
    return out


def runs_table(runs_dir) -> list[list]:
    rows = []
    for run in list_runs(runs_dir):
        s = run.summary()
        rows.append([s["run"], s["state"], f"{s['step']}/{s['total']}", s["flat_sigma"], s["ab_group"] or "",
                     s["final_loss"], manage.format_size(manage.disk_usage(run.path)), s["message"]])
    return rows


RUNS_HEADERS = ["run", "state", "step", "flat_sigma", "A/B group", "final loss", "size on disk", "message"]


def _follow_choices(runs_dir) -> list[str]:
    return [r.name for r in list_runs(runs_dir)]


def _default_follow(runs_dir, launcher: Launcher) -> str | None:
    running = launcher.snapshot()["running"]
    if running:
        return running
    runs = list_runs(runs_dir)
    return runs[0].name if runs else None


def _as_paths(files) -> list[str]:
    out = []
    for f in files or []:
        if isinstance(f, dict):
            f = f.get("path") or f.get("name")
        elif hasattr(f, "name") and not isinstance(f, (str, Path)):
            f = f.name
        if f:
            out.append(str(f))
    return out


def loss_chart(runs: list[Run]) -> str:
    return chart.loss_svg(compare.loss_series(runs))


def train_loss_chart(runs: list[Run]) -> str:
    """The Train tab's chart: drawn at about the width of its column (2/5 of the page), so that its text
    shows at 13 px there instead of being shrunk with a 640-unit drawing."""
    return chart.loss_svg(compare.loss_series(runs), width=480, height=300, font_px=13)


def _user_error(e: Exception) -> gr.Error:
    return gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__, print_exception=False)


# --- the page -------------------------------------------------------------------------------------------
def build_app(runs_dir, launcher: Launcher, generator: compare.Generator | None = None,
              refresh_s: float = 1.0) -> gr.Blocks:
    runs_dir = Path(runs_dir).resolve()
    generator = generator or compare.Generator()
    specs = form.form_fields()
    preset_dir = runs_dir / PRESET_DIR

    def preset_names() -> list[str]:
        return sorted(p.stem for p in preset_dir.glob("*.yaml")) if preset_dir.is_dir() else []

    # uploads and generated grids are Gradio's temporary files: dropped after a day
    with gr.Blocks(title="flatlora-diffusion", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("## flatlora-diffusion · DreamBooth LoRA with Flat-LoRA")
        with gr.Tabs(selected="train") as tabs:
            # ======================================================================== Train
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Accordion("Presets (YAML)", open=False):
                            with gr.Row():
                                preset_pick = gr.Dropdown(choices=preset_names(), label="saved presets",
                                                          allow_custom_value=False, scale=2)
                                preset_load_btn = gr.Button("Load preset", scale=1)
                            with gr.Row():
                                preset_name = gr.Textbox(label="preset name", placeholder="e.g. sdxl-portrait", scale=2)
                                preset_save_btn = gr.Button("Save current settings", scale=1)
                            with gr.Row():
                                preset_upload = gr.File(label="load a YAML preset or a run's config.yaml",
                                                        file_types=[".yaml", ".yml"], type="filepath")
                                preset_file = gr.File(label="saved preset", interactive=False)
                            preset_msg = gr.Markdown()
                        uploads = _uploads_box()
                        comps: dict[str, gr.components.Component] = {}
                        for spec in [s for s in specs if s.prominent]:
                            comps[spec.name] = _component(spec)
                        for group, title in form.GROUP_TITLES.items():
                            rest = [s for s in specs if not s.prominent and s.group == group]
                            if rest:
                                with gr.Accordion(f"More settings: {title}", open=False):
                                    for spec in rest:
                                        comps[spec.name] = _component(spec)
                    with gr.Column(scale=2):
                        run_name = gr.Textbox(label="run name", placeholder="(default: date and time)",
                                              elem_id="run-name")
                        ab = gr.Checkbox(label="A/B: train plain LoRA, then Flat-LoRA, with identical seeds",
                                         value=False, elem_id="ab")
                        run_plan = gr.Markdown(elem_id="run-plan")
                        reset_btn = gr.Button("Reset the form", size="sm", elem_id="reset-form")
                        with gr.Row():
                            launch_btn = gr.Button("Launch", variant="primary", elem_id="launch")
                            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                        launch_msg = gr.Markdown(elem_id="launch-msg")
                        follow = gr.Dropdown(choices=_follow_choices(runs_dir), value=None, label="following run", allow_custom_value=True,
                                             elem_id="follow")
                        progress = gr.HTML(elem_id="progress")
                        loss_plot = gr.HTML(label="loss", elem_id="loss-plot")
                        gallery = gr.Gallery(label="newest validation images", columns=4, height=260,
                                             elem_id="newest-images")
                        log_box = gr.Textbox(label="log (tail)", lines=12, max_lines=12, autoscroll=True,
                                             interactive=False, elem_id="log")
                        queue_md = gr.Markdown(elem_id="queue")
            # ======================================================================== Runs
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as runs_tab:
                with gr.Row():
                    runs_refresh = gr.Button("Refresh", scale=0)
                runs_df = gr.Dataframe(headers=RUNS_HEADERS, value=runs_table(runs_dir), interactive=False,
                                       elem_id="runs-table")
                with gr.Row():
                    run_pick = gr.Dropdown(choices=_follow_choices(runs_dir), label="run", scale=2, elem_id="run-pick",
                                           allow_custom_value=True)
                    run_cancel_btn = gr.Button("Cancel run", variant="stop", scale=0)
                    run_resume_btn = gr.Button("Resume from last checkpoint", scale=0)
                    run_reuse_btn = gr.Button("Use these settings in Train", scale=0)
                with gr.Row():
                    rename_to = gr.Textbox(label="New name", scale=2, elem_id="rename-to")
                    run_rename_btn = gr.Button("Rename run", scale=0, elem_id="rename-run")
                    run_delete_btn = gr.Button("Delete run", variant="stop", scale=0, elem_id="delete-run")
                run_msg = gr.Markdown(elem_id="run-msg")
                with gr.Row():
                    dl_kohya = gr.DownloadButton("kohya file (ComfyUI / A1111)", visible=False, elem_id="dl-kohya")
                    dl_diffusers = gr.DownloadButton("diffusers file", visible=False, elem_id="dl-diffusers")
                with gr.Row():
                    run_summary = gr.JSON(label="metrics")
                    run_settings = gr.Code(label="config.yaml", language="yaml", interactive=False)
            # ======================================================================== Compare
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare_tab:
                with gr.Row():
                    cmp_runs = gr.Dropdown(choices=_follow_choices(runs_dir), multiselect=True, scale=3, allow_custom_value=True,
                                           label="runs to compare (two or more)", elem_id="cmp-runs")
                    cmp_refresh = gr.Button("Refresh", scale=0)
                cmp_step = gr.Slider(minimum=0, maximum=1, step=1, value=0,
                                     label="step (of the runs' columns; the base-model column shows step 0)",
                                     elem_id="cmp-step")
                cmp_info = gr.Markdown(elem_id="cmp-info")
                cmp_grid = gr.Image(label="validation images", type="pil", format="png", interactive=False,
                                    elem_id="cmp-grid")
                cmp_step_files = gr.File(label="LoRA of the shown step, per run (named <run>_step<N>_<format>)",
                                         file_count="multiple", interactive=False, elem_id="cmp-step-files")
                cmp_step_note = gr.Markdown(elem_id="cmp-step-note")
                cmp_loss = gr.HTML(label="loss", elem_id="cmp-loss")
                with gr.Row():
                    cmp_table_note = gr.Markdown(elem_id="cmp-table-note")
                    cmp_all_settings = gr.Checkbox(label="show all settings", value=False, scale=0,
                                                   elem_id="cmp-all-settings")
                cmp_table = gr.Dataframe(label="settings and metrics", interactive=False, elem_id="cmp-table")
                cmp_files = gr.File(label="final LoRA files of the selected runs (named <run>_<format>)",
                                    file_count="multiple",
                                    interactive=False, elem_id="cmp-files")
                with gr.Accordion("Evaluation: held-out loss, sharpness, image scores", open=True):
                    with gr.Row():
                        cmp_eval_btn = gr.Button("Evaluate selected runs", scale=0, elem_id="cmp-eval-btn")
                        cmp_eval_cancel = gr.Button("Cancel their evaluation", scale=0)
                    cmp_eval_msg = gr.Markdown(elem_id="cmp-eval-msg")
                    cmp_eval_table = gr.Dataframe(label="evaluation (each run's eval.json)", interactive=False,
                                                  elem_id="cmp-eval")
                    cmp_sharp = gr.HTML(label="sharpness", elem_id="cmp-sharp")
                with gr.Accordion("Generate now", open=True):
                    with gr.Row():
                        gen_prompt = gr.Textbox(label="prompt", scale=3, elem_id="gen-prompt")
                        gen_negative = gr.Textbox(label="negative prompt", scale=2)
                    with gr.Row():
                        gen_seed = gr.Number(label="seed", value=0, precision=0)
                        gen_strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA strength")
                        gen_steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                        gen_guidance = gr.Slider(1.0, 15.0, value=7.0, step=0.5, label="guidance scale")
                        gen_base = gr.Checkbox(label="include the base model", value=True)
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-btn")
                    gen_image = gr.Image(label="generated", type="pil", format="png", interactive=False,
                                         elem_id="gen-image")

        field_comps = [comps[s.name] for s in specs]
        seen = gr.State({})
        timer = gr.Timer(refresh_s)

        # ------------------------------------------------------------------ Train: launch / cancel / watch
        guard = LaunchGuard()

        def launch(ab_on: bool, name: str, images, request: gr.Request = None, **settings):
            repeated = guard.repeat_of(request, (ab_on, name, _as_paths(images), settings))
            if repeated:  # a double click: the first click's runs are queued already
                return (f"Queued **{' then '.join(repeated)}** (the second click was ignored).",
                        gr.Dropdown(choices=_follow_choices(runs_dir), value=repeated[0]))
            try:
                values = form.values_from_widgets(settings)
                paths = _as_paths(images)
                names = prepare_runs(runs_dir, values, name=name, ab=bool(ab_on), uploads=paths,
                                     upload_names=[Path(p).name for p in paths])
                launcher.submit(names)
            except (ConfigError, SubmitError) as e:
                guard.forget(request)
                raise _user_error(e) from None
            guard.done(request, names)
            msg = f"Queued **{' then '.join(names)}**."
            return msg, gr.Dropdown(choices=_follow_choices(runs_dir), value=names[0])

        launch_btn.click(launch, inputs=[ab, run_name, uploads], inputs_kwargs=dict(comps),
                         outputs=[launch_msg, follow], api_name="launch")
        _wire_plan(demo, runs_dir, comps, uploads, ab, run_plan)

        def cancel(name: str | None, confirmed: bool = True):
            if not name:
                return "Nothing to cancel."
            if not confirmed:
                return f"Not cancelled: {name} goes on."
            try:
                members = group_runs(list_runs(runs_dir), name)
                said = [launcher.cancel(r.name) for r in members if r.state in ACTIVE]
            except KeyError as e:
                raise _user_error(e) from None
            return "  \n".join(said) or f"{name} is not running."

        # the page asks first (confirm_js); scripts calling /cancel have said what they want
        cancel_confirmed = gr.Checkbox(value=True, visible=False)
        cancel_btn.click(cancel, inputs=[follow, cancel_confirmed], outputs=[launch_msg], api_name="cancel",
                         js=confirm_js("Stop the training of ${name} (and its A/B partner)? The current step is "
                                       "saved as a checkpoint."))
        _wire_form_memory(demo, comps, ab, reset_btn)

        def watch(name: str | None, seen_state: dict):
            seen_state = dict(seen_state or {})
            names = tuple(_follow_choices(runs_dir))
            follow_update = gr.skip()
            if names != seen_state.get("names"):
                seen_state["names"] = names
                follow_update = gr.Dropdown(choices=list(names))
            if not name:
                name = _default_follow(runs_dir, launcher)
                if name:
                    follow_update = gr.Dropdown(choices=list(names), value=name)
            members = group_runs(list_runs(runs_dir), name) if name else []
            plot_key = (name, tuple((r.name, (r.path / "metrics.jsonl").stat().st_size
                                     if (r.path / "metrics.jsonl").exists() else 0) for r in members))
            plot = gr.skip()
            if plot_key != seen_state.get("plot"):
                seen_state["plot"] = plot_key
                plot = train_loss_chart(members)
            images = newest_images(members)
            gallery_key = tuple(p for p, _ in images)
            gal = gr.skip()
            if gallery_key != seen_state.get("gallery"):
                seen_state["gallery"] = gallery_key
                gal = images
            shown = next((r for r in members if r.state == "running"), None) or \
                next((r for r in reversed(members) if r.state in TERMINAL), None) or (members[0] if members else None)
            tail = shown.log_tail(60) if shown else ""
            return (progress_html(members, launcher), plot, gal, tail, queue_markdown(launcher), follow_update,
                    seen_state)

        watch_outputs = [progress, loss_plot, gallery, log_box, queue_md, follow, seen]
        timer.tick(watch, inputs=[follow, seen], outputs=watch_outputs, show_progress="hidden",
                   concurrency_limit=None, api_visibility="private")
        follow.change(lambda n, s: watch(n, {}), inputs=[follow, seen], outputs=watch_outputs,
                      show_progress="hidden", api_visibility="private")
        demo.load(watch, inputs=[follow, seen], outputs=watch_outputs, api_visibility="private")

        def job_status(run: str) -> dict:
            """The status of a run and of its A/B partner, and the queue."""
            try:
                get_run(runs_dir, run)
            except KeyError as e:
                raise _user_error(e) from None
            members = group_runs(list_runs(runs_dir), run)
            return {"runs": {r.name: {**r.status(), "label": compare.run_label(r), "log_tail": r.log_tail(5),
                                      "metrics": len(r.metrics()), "sample_steps": r.sample_steps()}
                             for r in members},
                    "queue": launcher.snapshot()}

        gr.api(job_status, api_name="status", concurrency_limit=None)

        def all_runs() -> list[dict]:
            """Every run in the runs folder with its state and key metrics, newest first."""
            return [r.summary() for r in list_runs(runs_dir)]

        gr.api(all_runs, api_name="runs", concurrency_limit=None)

        # ------------------------------------------------------------------ Train: presets
        def save_preset(pname: str, **settings):
            try:
                values = form.values_from_widgets(settings)
            except ConfigError as e:
                raise _user_error(e) from None
            clean = safe_name(pname, default="")
            if not clean:
                raise gr.Error("give the preset a name", print_exception=False)
            preset_dir.mkdir(parents=True, exist_ok=True)
            path = preset_dir / f"{clean}.yaml"
            path.write_text(form.preset_yaml(values))
            return (f"Saved preset **{clean}** ({len(form.non_default(values))} settings).",
                    gr.Dropdown(choices=preset_names(), value=clean), str(path))

        preset_save_btn.click(save_preset, inputs=[preset_name], inputs_kwargs=dict(comps),
                              outputs=[preset_msg, preset_pick, preset_file], api_name="save_preset")

        def _fill_form(path) -> list:
            try:
                values, ignored = form.load_preset(path)
            except ConfigError as e:
                raise _user_error(e) from None
            widgets = form.widgets_from_values(values)
            note = f"Loaded {len(values)} settings from {Path(path).name}."
            if ignored:
                note += f" Not taken over (the app sets them): {', '.join(ignored)}."
            return [note] + [widgets[s.name] for s in specs]

        def load_preset(pname: str):
            if not pname or pname not in preset_names():
                raise gr.Error("pick a saved preset", print_exception=False)
            return _fill_form(preset_dir / f"{pname}.yaml")

        preset_load_btn.click(load_preset, inputs=[preset_pick], outputs=[preset_msg, *field_comps],
                              api_name="load_preset")

        def upload_preset(path):
            if not path:
                return [gr.skip()] * (1 + len(field_comps))
            return _fill_form(path)

        preset_upload.upload(upload_preset, inputs=[preset_upload], outputs=[preset_msg, *field_comps],
                             api_visibility="private")

        # ------------------------------------------------------------------ Runs
        def refresh_runs(current: str | None):
            names = _follow_choices(runs_dir)
            value = current if current in names else names[0] if names else None
            return runs_table(runs_dir), gr.Dropdown(choices=names, value=value)


        def run_details(name: str | None):
            if not name:
                return ({}, "", gr.DownloadButton(visible=False), gr.DownloadButton(visible=False), gr.skip())
            try:
                run = get_run(runs_dir, name)
            except KeyError as e:
                raise _user_error(e) from None
            files = run.exports()
            try:
                cfg_text = (run.path / "config.yaml").read_text()
            except OSError:
                cfg_text = ""
            k, d = files["kohya"], files["diffusers"]
            if d:  # every run's diffusers file is pytorch_lora_weights.safetensors: offered as <run>_diffusers
                d = downloads.offer(run, d, downloads.download_name(run.name, "diffusers"))
            return (run.summary(), cfg_text,
                    gr.DownloadButton(f"kohya file: {k.name}" if k else "kohya file", value=str(k) if k else None,
                                      visible=k is not None),
                    gr.DownloadButton(f"diffusers file: {d.name}" if d else "diffusers file",
                                      value=str(d) if d else None, visible=d is not None),
                    gr.skip())  # an action's message stays until it expires (_expire_message)

        details_outputs = [run_summary, run_settings, dl_kohya, dl_diffusers, run_msg]
        run_pick.change(run_details, inputs=[run_pick], outputs=details_outputs, api_visibility="private")

        def pick_row(evt: gr.SelectData):
            row = evt.row_value or []
            return gr.Dropdown(choices=_follow_choices(runs_dir), value=row[0]) if row else gr.skip()

        runs_df.select(pick_row, outputs=[run_pick], api_visibility="private")
        for trigger in (runs_refresh.click, runs_tab.select, demo.load):
            trigger(refresh_runs, inputs=[run_pick], outputs=[runs_df, run_pick], api_visibility="private").then(
                run_details, inputs=[run_pick], outputs=details_outputs, api_visibility="private")
        runs_timer = gr.Timer(max(4 * refresh_s, 2.0))
        _wire_runs_autorefresh(runs_dir, runs_timer, runs_df, run_pick)
        _wire_runs_admin(runs_dir, launcher, run_pick, rename_to, run_rename_btn, run_delete_btn, run_msg,
                         runs_df, refresh_runs, run_details, details_outputs)
        _expire_message(run_msg, runs_timer, after_s=max(10 * refresh_s, 5.0))
        _expire_message(launch_msg, runs_timer, after_s=max(10 * refresh_s, 5.0))

        def run_files(run: str) -> tuple:
            try:
                files = get_run(runs_dir, run).exports()
            except KeyError as e:
                raise _user_error(e) from None
            return (str(files["kohya"]) if files["kohya"] else None,
                    str(files["diffusers"]) if files["diffusers"] else None)

        # the two download buttons' files, for scripts
        hidden_kohya = gr.File(visible=False)
        hidden_diffusers = gr.File(visible=False)
        run_api_btn = gr.Button(visible=False)
        run_api_btn.click(run_files, inputs=[run_pick], outputs=[hidden_kohya, hidden_diffusers], api_name="files")

        def cancel_run(name: str | None):
            if not name:
                return "Pick a run."
            try:
                return launcher.cancel(name)
            except KeyError as e:
                raise _user_error(e) from None

        run_cancel_btn.click(cancel_run, inputs=[run_pick], outputs=[run_msg], api_visibility="private")

        def resume_run(name: str | None):
            if not name:
                return "Pick a run."
            try:
                run = get_run(runs_dir, name)
                if run.state not in ("failed", "cancelled"):
                    return f"{name} is {run.state}; only a failed or cancelled run can be resumed."
                if not any((run.path / "checkpoints").glob("checkpoint-*")):
                    return f"{name} has no checkpoint to resume from."
                from flatlora_diffusion.config import make_config, save_yaml

                values = {k: v for k, v in run.config().items()}
                values.update(resume_from_checkpoint="latest", output_dir=str(run.path))
                save_yaml(make_config(values), run.path / "config.yaml")
                run.update_status(state="queued", message="waiting in the queue (resume)", finished_at=None)
                launcher.submit([name])
            except (KeyError, ConfigError) as e:
                raise _user_error(e) from None
            return f"{name}: queued to resume from its last checkpoint."

        run_resume_btn.click(resume_run, inputs=[run_pick], outputs=[run_msg], api_visibility="private")

        def reuse_settings(name: str | None):
            if not name:
                raise gr.Error("pick a run", print_exception=False)
            try:
                run = get_run(runs_dir, name)
            except KeyError as e:
                raise _user_error(e) from None
            out = _fill_form(run.path / "config.yaml")
            return [gr.Tabs(selected="train")] + out

        run_reuse_btn.click(reuse_settings, inputs=[run_pick], outputs=[tabs, preset_msg, *field_comps],
                            api_visibility="private")

        # ------------------------------------------------------------------ Compare
        def _picked(names) -> list[Run]:
            runs = []
            for n in names or []:
                try:
                    runs.append(get_run(runs_dir, n))
                except KeyError as e:
                    raise _user_error(e) from None
            return runs

        def step_view(runs: list[str], step: float | None):
            """What the slider changes: the image grid, the line that says which steps it shows, and the LoRA
            files of those steps."""
            picked = _picked(runs)
            if not picked:  # nothing selected: say why, when it is that no run has images
                return None, compare.default_selection(list_runs(runs_dir))[1] or "Pick two or more runs.", [], ""
            steps = compare.all_steps(picked)
            if not steps:
                return None, "These runs have no validation images yet.", [], ""
            grid, used, found = compare.validation_grid(picked, int(step) if step is not None else None)
            info = ("Validation steps: " + ", ".join(str(s) for s in steps) + ". Shown: "
                    + ", ".join(f"{r.name} at step {u}" for r, u in zip(picked, used))
                    + ".  \n" + compare.baseline_note(found))
            files, note = downloads.step_files(picked, used)
            return grid, info, [str(p) for p in files], note

        def table_view(runs: list[str], show_all: bool):
            """The settings table (those that differ, or all) and the line that says which it holds."""
            picked = _picked(runs)
            if not picked:
                return None, ""
            headers, rows, note = compare_table.settings_table(picked, bool(show_all))
            return {"headers": headers, "data": rows}, note

        def runs_view(runs: list[str], show_all: bool):
            """What does not depend on the step: the loss curves, the settings table, the LoRA files."""
            picked = _picked(runs)
            downloads.prune(runs_dir)
            files = [str(p) for r in picked for p in downloads.final_files(r)]
            table, note = table_view(runs, show_all)
            return loss_chart(picked), table, files, note

        def compare_runs(runs: list[str], step: float | None, show_all: bool = False):
            grid, info, step_files, step_note = step_view(runs, step)
            loss, table, files, table_note = runs_view(runs, show_all)
            return grid, info, loss, table, files, step_files, step_note, table_note

        def evaluation_view(runs: list[str]):
            """The evaluation table (one row per selected run; 'not evaluated' without eval.json), the sharpness
            curves of the evaluated ones, and where each run's evaluation stands."""
            picked = _picked(runs)
            headers, rows = evaluations.eval_table(picked)
            snap = launcher.eval_snapshot()
            status = evaluations.status_markdown(picked, snap["waiting"], snap["evaluating"])
            return ({"headers": headers, "data": rows}, chart.sharpness_svg(evaluations.sharpness_series(picked)),
                    status or "Pick runs to see their evaluation.")

        step_outputs = [cmp_grid, cmp_info, cmp_step_files, cmp_step_note]
        cmp_outputs = [cmp_grid, cmp_info, cmp_loss, cmp_table, cmp_files, cmp_step_files, cmp_step_note,
                       cmp_table_note]
        eval_outputs = [cmp_eval_table, cmp_sharp, cmp_eval_msg]
        # the selection and step the grid shows, kept on the server: a slider value set by an answer reaches the
        # page's slider a moment later than a following .then reads it, so the grid follows this, not that
        cmp_at = gr.State(None)

        def pick_runs(runs: list[str], show_all: bool, at):
            """A new selection puts the slider on its newest step. The same selection again (the page sends its
            change more than once while it opens) keeps the step where the user put it."""
            picked = _picked(runs)
            names = [r.name for r in picked]
            slider = gr.skip()
            if not at or at["runs"] != names:
                steps = compare.all_steps(picked)
                top = steps[-1] if steps else 0
                slider = gr.Slider(minimum=0, maximum=max(top, 1), step=compare.step_granularity(steps), value=top)
                at = {"runs": names, "step": top}
            return (slider, *runs_view(runs, show_all), at, *evaluation_view(runs))

        def draw(runs: list[str], at):
            """The grid of the step kept for this selection (the newest step when it was kept for another: the
            page may send a selection's change before the selection itself)."""
            return step_view(runs, at["step"] if at and at["runs"] == list(runs or []) else None)

        def move_step(runs: list[str], step: float | None):
            return (*step_view(runs, step), {"runs": list(runs or []), "step": step})

        # One listener only: Gradio's multiselect dropdown fires change whenever its value is sent anew, even
        # unchanged, and with two listeners of its change each one's answer set off the other again: the tab
        # redrew itself every second and its busy overlays caught the clicks. All grid drawing shares one
        # queue, so the drawing asked for last is the one left on the page.
        cmp_runs.change(pick_runs, inputs=[cmp_runs, cmp_all_settings, cmp_at],
                        outputs=[cmp_step, cmp_loss, cmp_table, cmp_files, cmp_table_note, cmp_at, *eval_outputs],
                        api_visibility="private").then(
            draw, inputs=[cmp_runs, cmp_at], outputs=step_outputs, concurrency_id="cmp-grid",
            trigger_mode="always_last", api_visibility="private")  # "once" dropped a draw while one was pending
        # a step typed into the slider's number box fires input (Enter does not blur, so no release comes);
        # dragging fires input all along and release at the end: the newest value wins
        gr.on([cmp_step.input, cmp_step.release], move_step, inputs=[cmp_runs, cmp_step],
              outputs=[*step_outputs, cmp_at], trigger_mode="always_last", show_progress="hidden",
              concurrency_id="cmp-grid", api_visibility="private")
        # for scripts: the slider's bounds follow the selected runs, so the API takes the step as a plain number
        cmp_step_api = gr.Number(visible=False, precision=0)
        cmp_api_btn = gr.Button(visible=False)
        cmp_api_btn.click(compare_runs, inputs=[cmp_runs, cmp_step_api, cmp_all_settings], outputs=cmp_outputs,
                          api_name="compare")
        cmp_all_settings.change(table_view, inputs=[cmp_runs, cmp_all_settings], outputs=[cmp_table, cmp_table_note],
                                api_visibility="private")
        cmp_refresh.click(lambda: gr.Dropdown(choices=_follow_choices(runs_dir)), outputs=[cmp_runs],
                          api_visibility="private")

        def default_compare(selected):
            """Preselect runs with images to compare (compare.default_selection) when the page opens and when
            the tab is opened with nothing selected; the user's own selection stays."""
            runs = list_runs(runs_dir)
            names = [r.name for r in runs]
            if selected:
                return gr.Dropdown(choices=names)
            return gr.Dropdown(choices=names, value=compare.default_selection(runs)[0])

        demo.load(default_compare, inputs=[cmp_runs], outputs=[cmp_runs], api_visibility="private")

        # ------------------------------------------------------------------ Compare: evaluation
        eval_api_btn = gr.Button(visible=False)
        eval_api_btn.click(evaluation_view, inputs=[cmp_runs], outputs=eval_outputs, api_name="evaluations")

        def evaluate_runs(runs: list[str]):
            """Queue `flatlora-diffusion evaluate` for each selected finished run (one job at a time, in the
            training queue's order); says what happened to each."""
            picked = _picked(runs)
            if not picked:
                raise gr.Error("pick at least one finished run", print_exception=False)
            said = []
            for run in picked:
                try:
                    said.append(launcher.submit_evaluation(run.name))
                except EvaluationRefused as e:
                    said.append(str(e))
                except KeyError as e:
                    raise _user_error(e) from None
            table, svg, status = evaluation_view(runs)
            return table, svg, "  \n".join(said) + "  \n" + status

        cmp_eval_btn.click(evaluate_runs, inputs=[cmp_runs], outputs=eval_outputs, api_name="evaluate")

        def cancel_evaluations(runs: list[str]):
            said = [launcher.cancel_evaluation(r.name) for r in _picked(runs)]
            table, svg, status = evaluation_view(runs)
            return table, svg, "  \n".join(said + [status])

        cmp_eval_cancel.click(cancel_evaluations, inputs=[cmp_runs], outputs=eval_outputs, api_visibility="private")

        # while the Compare tab is open, the evaluation view follows finished evaluations (redrawn only on change)
        eval_seen = gr.State(None)
        eval_timer = gr.Timer(max(refresh_s, 1.0))

        def follow_evaluations(runs: list[str], seen):
            try:
                picked = _picked(runs)
            except gr.Error:
                return gr.skip(), gr.skip(), gr.skip(), seen
            key = repr((launcher.eval_snapshot(), [(r.name, evaluations.eval_status(r),
                                                    (r.path / evaluations.EVAL_FILE).exists()) for r in picked]))
            if key == seen:
                return gr.skip(), gr.skip(), gr.skip(), seen
            return (*evaluation_view(runs), key)

        eval_timer.tick(follow_evaluations, inputs=[cmp_runs, eval_seen], outputs=[*eval_outputs, eval_seen],
                        show_progress="hidden", concurrency_limit=None, api_visibility="private")
        compare_tab.select(default_compare, inputs=[cmp_runs], outputs=[cmp_runs], api_visibility="private")

        def generate_now(runs: list[str], prompt: str, negative_prompt: str, seed: float, strength: float,
                         steps: float, guidance_scale: float, include_base: bool):
            from flatlora_diffusion.sample import SampleError

            picked = _picked(runs)
            if not picked:
                raise gr.Error("pick at least one run", print_exception=False)
            try:
                return generator.generate(picked, prompt, int(seed or 0), float(strength), int(steps),
                                          float(guidance_scale), negative_prompt, bool(include_base))
            except SampleError as e:
                raise _user_error(e) from None

        gen_btn.click(generate_now,
                      inputs=[cmp_runs, gen_prompt, gen_negative, gen_seed, gen_strength, gen_steps, gen_guidance,
                              gen_base],
                      outputs=[gen_image], api_name="generate")
    return demo


def plan_view(runs_dir: Path, ab_on: bool, files, settings: dict) -> str:
    """The run plan of the form as it stands (plan.py), or what keeps the form from becoming a run."""
    try:
        values = form.values_from_widgets(settings)
    except ConfigError as e:
        return f"⚠️ {e}"
    paths = _as_paths(files)
    pictures, captions = split_uploads(paths, [Path(p).name for p in paths], caption_suffix(values))
    images = len(pictures) if paths else plan.count_folder_images(values.get("instance_data_dir"))
    if not paths and not values.get("instance_data_dir") and not values.get("dataset_name"):
        images = 0
    captioned = bool(pictures) and all(Path(n).stem in captions for _, n in pictures)
    the_plan = plan.make_plan(values, images, runs=2 if ab_on else 1, runs_dir=runs_dir, captions_cover_all=captioned)
    return "**Run plan**  \n" + plan.plan_markdown(the_plan)


class LaunchGuard:
    """Launch ignores a second click: the same form launched again by the same browser tab within a few
    seconds (a double click, or an impatient one while the first is being written) queues nothing new."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[str, float, list[str] | None]] = {}

    @staticmethod
    def _session(request) -> str:
        return getattr(request, "session_hash", None) or "api"

    def repeat_of(self, request, form_state) -> list[str] | None:
        """The runs the same form queued moments ago (waiting for them while they are being written); None
        for a new launch, which is recorded as in progress."""
        key, session = repr(form_state), self._session(request)
        deadline = time.monotonic() + 30
        while True:
            with self._lock:
                last = self._last.get(session)
                if not last or last[0] != key or time.monotonic() - last[1] > self.window_s:
                    self._last[session] = (key, time.monotonic(), None)
                    return None
                if last[2] is not None:
                    return last[2]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)  # the first click's launch is still writing its folders

    def done(self, request, names: list[str]) -> None:
        with self._lock:
            key, _, _ = self._last.get(self._session(request), ("", 0.0, None))
            self._last[self._session(request)] = (key, time.monotonic(), names)

    def forget(self, request) -> None:
        with self._lock:
            self._last.pop(self._session(request), None)


def confirm_js(question: str) -> str:
    """A click handler's js: asks `question` (${name} = the first input) in the browser and passes the answer
    as the second input; the handler does nothing when it is no."""
    return ("(name, _ok) => [name, name ? window.confirm(`" + question.replace("`", "'") + "`) : false]")


def _wire_form_memory(demo: gr.Blocks, comps: dict, ab, reset_btn) -> None:
    """The form survives a reload: every change is kept in this browser's localStorage (gr.BrowserState) and
    put back when the page opens. Uploads are not kept (the browser must send files again). Reset the form
    goes back to the starting values."""
    specs = form.spec_by_name()
    names = list(comps)
    memory = gr.BrowserState({}, storage_key="flatlora-train-form")

    def remember(ab_on: bool, **settings):
        return {"fields": settings, "ab": bool(ab_on)}

    def restore(saved):
        saved = saved if isinstance(saved, dict) else {}
        fields = saved.get("fields") if isinstance(saved.get("fields"), dict) else {}
        out = [fields[n] if n in fields else gr.skip() for n in names]
        return out + [bool(saved["ab"]) if "ab" in saved else gr.skip()]

    def reset():
        return [specs[n].widget_default() for n in names] + [False]

    gr.on([c.change for c in comps.values()] + [ab.change], remember, inputs=[ab], inputs_kwargs=dict(comps),
          outputs=[memory], show_progress="hidden", trigger_mode="always_last", api_visibility="private")
    demo.load(restore, inputs=[memory], outputs=[*comps.values(), ab], api_visibility="private")
    reset_btn.click(reset, outputs=[*comps.values(), ab], api_visibility="private")


def _wire_runs_autorefresh(runs_dir: Path, timer: gr.Timer, runs_df, run_pick) -> None:
    """The Runs table and the run picker follow the runs folder by themselves (sent only when they changed,
    so a row being read is not redrawn every few seconds)."""
    shown = gr.State(None)

    def tick(last):
        rows = runs_table(runs_dir)
        if rows == last:
            return gr.skip(), gr.skip(), last
        # choices only: the value read when the tick started may be older than the user's pick by now
        return rows, gr.Dropdown(choices=_follow_choices(runs_dir)), rows

    timer.tick(tick, inputs=[shown], outputs=[runs_df, run_pick, shown], show_progress="hidden",
               concurrency_limit=None, api_visibility="private")


def _wire_runs_admin(runs_dir: Path, launcher: Launcher, run_pick, rename_to, rename_btn, delete_btn, run_msg,
                     runs_df, refresh_runs, run_details, details_outputs) -> None:
    """Delete and rename a run, after the browser asked; refused while the run trains or waits."""
    def busy(name: str) -> bool:
        return launcher.position(name) is not None

    def delete(name: str | None, confirmed: bool = True):
        if not name:
            return "Pick a run."
        if not confirmed:
            return f"Not deleted: {name} stays."
        try:
            return manage.delete_run(runs_dir, name, busy(name))
        except (KeyError, manage.RunBusy) as e:
            return f"⚠️ {str(e).strip(chr(39))}"

    def rename(name: str | None, new_name: str, confirmed: bool = True):
        if not name:
            return "Pick a run.", gr.skip()
        if not confirmed:
            return f"Not renamed: {name} keeps its name.", gr.skip()
        try:
            new = manage.rename_run(runs_dir, name, new_name or "", busy(name))
        except (KeyError, ValueError) as e:
            return f"⚠️ {str(e).strip(chr(39))}", gr.skip()
        return f"Renamed {name} to **{new}**.", gr.Dropdown(choices=_follow_choices(runs_dir), value=new)

    confirmed = gr.Checkbox(value=True, visible=False)
    delete_btn.click(delete, inputs=[run_pick, confirmed], outputs=[run_msg], api_name="delete_run",
                     js=confirm_js("Delete ${name} and all its files (LoRA files, checkpoints, images)? "
                                   "This cannot be undone.")
                     ).then(refresh_runs, inputs=[run_pick], outputs=[runs_df, run_pick], api_visibility="private")
    rename_js = ("(name, new_name, _ok) => [name, new_name, name && new_name ? "
                 "window.confirm(`Rename ${name} to ${new_name}?`) : true]")
    rename_btn.click(rename, inputs=[run_pick, rename_to, confirmed], outputs=[run_msg, run_pick],
                     api_name="rename_run", js=rename_js
                     ).then(refresh_runs, inputs=[run_pick], outputs=[runs_df, run_pick], api_visibility="private")


def _expire_message(message, timer: gr.Timer, after_s: float = 12.0) -> None:
    """An action's message ("Queued ...", "Deleted ...") is cleared a few seconds later, so that it never
    describes a state that has since moved on; the live views say what is true now."""
    shown_at = gr.State(None)

    def stamp(text):
        return time.monotonic() if text else None

    def clear(since):
        if since is None or time.monotonic() - since < after_s:
            return gr.skip(), gr.skip()
        return "", None

    message.change(stamp, inputs=[message], outputs=[shown_at], show_progress="hidden", api_visibility="private")
    timer.tick(clear, inputs=[shown_at], outputs=[message, shown_at], show_progress="hidden",
               concurrency_limit=None, api_visibility="private")


def _uploads_box() -> gr.File:
    """Images, and caption files named like their image (photo.png + photo.txt), in one upload box."""
    return gr.File(label="Training images (PNG, JPEG, WebP, BMP, TIFF) and, optionally, a caption for each: "
                         "photo.txt beside photo.png", file_count="multiple",
                   file_types=["image", ".txt", ".caption"], type="filepath", elem_id="uploads")


def _wire_plan(demo: gr.Blocks, runs_dir: Path, comps: dict, uploads, ab, run_plan) -> None:
    """Redraw the run plan whenever the form, the uploads or the A/B switch change, and on page load."""
    def redraw(ab_on: bool, files, **settings):
        return plan_view(runs_dir, ab_on, files, settings)

    triggers = [c.change for c in comps.values()] + [uploads.change, ab.change, demo.load]
    gr.on(triggers, redraw, inputs=[ab, uploads], inputs_kwargs=dict(comps), outputs=[run_plan],
          show_progress="hidden", trigger_mode="always_last", api_visibility="private")


def _component(spec: form.FieldSpec):
    value = spec.widget_default()
    common = dict(label=spec.label, info=spec.info, elem_id=f"field-{spec.name}")
    if spec.kind == "checkbox":
        return gr.Checkbox(value=value, **common)
    if spec.kind == "dropdown":
        choices = ([form.DEFAULT_CHOICE] if spec.optional else []) + list(spec.choices or [])
        return gr.Dropdown(choices=choices, value=value, **common)
    if spec.kind == "checkboxgroup":
        return gr.CheckboxGroup(choices=list(spec.choices or []), value=value, **common)
    if spec.kind == "number":
        return gr.Number(value=value, precision=0 if spec.elem is int else None, **common)
    if spec.kind == "lines":
        return gr.Textbox(value=value, lines=3, **common)
    placeholder = None
    if spec.name == "instance_data_dir":
        placeholder = "absolute path of a folder of images (or upload images above)"
    elif spec.name == "pretrained_model_name_or_path":
        placeholder = "hub id, diffusers folder or .safetensors file"
    elif spec.name == "class_data_dir":
        placeholder = "(empty: generated into the run folder)"
    return gr.Textbox(value=value, placeholder=placeholder, **common)


__all__ = ["build_app", "progress_html", "queue_markdown", "runs_table"]
