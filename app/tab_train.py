"""The Train tab: the form (generated from form.py), presets, the run plan, Launch and Cancel, and the live
view of the followed run (progress, loss, newest images, log, queue); also the scripts' `status` and `runs`.

Like the other tab modules, it works in two steps that app.ui.build_app calls in turn: TrainTab(...) lays out
the components inside the page's gr.Tabs, and TrainTab.wire gives them their events once the gr.Tabs block is
closed. The timers, states and hidden components that the wiring makes must not sit inside a tab: Gradio does
not render an inactive tab's children (gr.Tab's render_children is False), and a timer there stops ticking
while another tab is open. Two steps also keep the page's components and events in the order they have always
had.
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path

import gradio as gr

from flatlora_diffusion.config import ConfigError

from . import chart, compare, form, plan
from .launcher import Launcher
from .runs import ACTIVE, TERMINAL, Run, format_eta, get_run, group_runs, list_runs, safe_name
from .submit import SubmitError, caption_suffix, prepare_runs, split_uploads
from .tab_shared import confirm_js, run_names, user_error

PRESET_DIR = ".presets"  # inside the runs folder
_STATE_COLOURS = {"running": "#2b7be4", "queued": "#b08900", "completed": "#2e9d4f", "failed": "#d03737",
                  "cancelled": "#555"}


# --- the live view of the followed run ------------------------------------------------------------------
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


def train_loss_chart(runs: list[Run]) -> str:
    """The Train tab's chart: drawn at about the width of its column (2/5 of the page), so that its text
    shows at 13 px there instead of being shrunk with a 640-unit drawing."""
    return chart.loss_svg(compare.loss_series(runs), width=480, height=300, font_px=13)


def _default_follow(runs_dir, launcher: Launcher) -> str | None:
    running = launcher.snapshot()["running"]
    if running:
        return running
    runs = list_runs(runs_dir)
    return runs[0].name if runs else None


# --- the form: uploads, the run plan, repeated launches, presets ----------------------------------------
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


def preset_names(preset_dir: Path) -> list[str]:
    return sorted(p.stem for p in preset_dir.glob("*.yaml")) if preset_dir.is_dir() else []


# --- the tab --------------------------------------------------------------------------------------------
class TrainTab:
    """The Train tab: its components (made by __init__, inside the page's gr.Tabs) and their events (wire)."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self.specs = specs = form.form_fields()
        self.preset_dir = runs_dir / PRESET_DIR
        with gr.Tab("Train", id="train", elem_id="tab-train"):
            with gr.Row():
                with gr.Column(scale=3):
                    self._presets_box()
                    self.uploads = _uploads_box()
                    self.comps: dict[str, gr.components.Component] = {}  # one per form field, by name
                    for spec in [s for s in specs if s.prominent]:
                        self.comps[spec.name] = _component(spec)
                    for group, title in form.GROUP_TITLES.items():
                        rest = [s for s in specs if not s.prominent and s.group == group]
                        if rest:
                            with gr.Accordion(f"More settings: {title}", open=False):
                                for spec in rest:
                                    self.comps[spec.name] = _component(spec)
                with gr.Column(scale=2):
                    self._launch_and_follow_column()
        self.field_comps = [self.comps[s.name] for s in specs]  # in the order of specs, as fill_form gives values

    def _presets_box(self) -> None:
        with gr.Accordion("Presets (YAML)", open=False):
            with gr.Row():
                self.preset_pick = gr.Dropdown(choices=preset_names(self.preset_dir), label="saved presets",
                                               allow_custom_value=False, scale=2)
                self.preset_load_btn = gr.Button("Load preset", scale=1)
            with gr.Row():
                self.preset_name = gr.Textbox(label="preset name", placeholder="e.g. sdxl-portrait", scale=2)
                self.preset_save_btn = gr.Button("Save current settings", scale=1)
            with gr.Row():
                self.preset_upload = gr.File(label="load a YAML preset or a run's config.yaml",
                                             file_types=[".yaml", ".yml"], type="filepath")
                self.preset_file = gr.File(label="saved preset", interactive=False)
            self.preset_msg = gr.Markdown()

    def _launch_and_follow_column(self) -> None:
        self.run_name = gr.Textbox(label="run name", placeholder="(default: date and time)", elem_id="run-name")
        self.ab = gr.Checkbox(label="A/B: train plain LoRA, then Flat-LoRA, with identical seeds", value=False,
                              elem_id="ab")
        self.run_plan = gr.Markdown(elem_id="run-plan")
        self.reset_btn = gr.Button("Reset the form", size="sm", elem_id="reset-form")
        with gr.Row():
            self.launch_btn = gr.Button("Launch", variant="primary", elem_id="launch")
            self.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
        self.launch_msg = gr.Markdown(elem_id="launch-msg")
        self.follow = gr.Dropdown(choices=run_names(self.runs_dir), value=None, label="following run",
                                  allow_custom_value=True, elem_id="follow")
        self.progress = gr.HTML(elem_id="progress")
        self.loss_plot = gr.HTML(label="loss", elem_id="loss-plot")
        self.gallery = gr.Gallery(label="newest validation images", columns=4, height=260, elem_id="newest-images")
        self.log_box = gr.Textbox(label="log (tail)", lines=12, max_lines=12, autoscroll=True, interactive=False,
                                  elem_id="log")
        self.queue_md = gr.Markdown(elem_id="queue")

    def fill_form(self, path) -> list:
        """The outputs [preset_msg, *field_comps] that put a preset or a run's config.yaml into the form."""
        try:
            values, ignored = form.load_preset(path)
        except ConfigError as e:
            raise user_error(e) from None
        widgets = form.widgets_from_values(values)
        note = f"Loaded {len(values)} settings from {Path(path).name}."
        if ignored:
            note += f" Not taken over (the app sets them): {', '.join(ignored)}."
        return [note] + [widgets[s.name] for s in self.specs]

    def wire(self, demo: gr.Blocks, launcher: Launcher, refresh_s: float) -> None:
        """Launch, Cancel, the run plan, the form's memory, the live view, the presets, and the `status` and
        `runs` endpoints for scripts."""
        runs_dir, comps, ab, follow = self.runs_dir, self.comps, self.ab, self.follow
        seen = gr.State({})
        timer = gr.Timer(refresh_s)

        # ------------------------------------------------------------------ launch / cancel / watch
        guard = LaunchGuard()

        def launch(ab_on: bool, name: str, images, request: gr.Request = None, **settings):
            repeated = guard.repeat_of(request, (ab_on, name, _as_paths(images), settings))
            if repeated:  # a double click: the first click's runs are queued already
                return (f"Queued **{' then '.join(repeated)}** (the second click was ignored).",
                        gr.Dropdown(choices=run_names(runs_dir), value=repeated[0]))
            try:
                values = form.values_from_widgets(settings)
                paths = _as_paths(images)
                names = prepare_runs(runs_dir, values, name=name, ab=bool(ab_on), uploads=paths,
                                     upload_names=[Path(p).name for p in paths])
                launcher.submit(names)
            except (ConfigError, SubmitError) as e:
                guard.forget(request)
                raise user_error(e) from None
            guard.done(request, names)
            msg = f"Queued **{' then '.join(names)}**."
            return msg, gr.Dropdown(choices=run_names(runs_dir), value=names[0])

        self.launch_btn.click(launch, inputs=[ab, self.run_name, self.uploads], inputs_kwargs=dict(comps),
                              outputs=[self.launch_msg, follow], api_name="launch")
        _wire_plan(demo, runs_dir, comps, self.uploads, ab, self.run_plan)

        def cancel(name: str | None, confirmed: bool = True):
            if not name:
                return "Nothing to cancel."
            if not confirmed:
                return f"Not cancelled: {name} goes on."
            try:
                members = group_runs(list_runs(runs_dir), name)
                said = [launcher.cancel(r.name) for r in members if r.state in ACTIVE]
            except KeyError as e:
                raise user_error(e) from None
            return "  \n".join(said) or f"{name} is not running."

        # the page asks first (confirm_js); scripts calling /cancel have said what they want
        cancel_confirmed = gr.Checkbox(value=True, visible=False)
        self.cancel_btn.click(cancel, inputs=[follow, cancel_confirmed], outputs=[self.launch_msg],
                              api_name="cancel",
                              js=confirm_js("Stop the training of ${name} (and its A/B partner)? The current step "
                                            "is saved as a checkpoint."))
        _wire_form_memory(demo, comps, ab, self.reset_btn)

        def watch(name: str | None, seen_state: dict):
            seen_state = dict(seen_state or {})
            names = tuple(run_names(runs_dir))
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

        watch_outputs = [self.progress, self.loss_plot, self.gallery, self.log_box, self.queue_md, follow, seen]
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
                raise user_error(e) from None
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

        # ------------------------------------------------------------------ presets
        preset_dir = self.preset_dir

        def save_preset(pname: str, **settings):
            try:
                values = form.values_from_widgets(settings)
            except ConfigError as e:
                raise user_error(e) from None
            clean = safe_name(pname, default="")
            if not clean:
                raise gr.Error("give the preset a name", print_exception=False)
            preset_dir.mkdir(parents=True, exist_ok=True)
            path = preset_dir / f"{clean}.yaml"
            path.write_text(form.preset_yaml(values))
            return (f"Saved preset **{clean}** ({len(form.non_default(values))} settings).",
                    gr.Dropdown(choices=preset_names(preset_dir), value=clean), str(path))

        self.preset_save_btn.click(save_preset, inputs=[self.preset_name], inputs_kwargs=dict(comps),
                                   outputs=[self.preset_msg, self.preset_pick, self.preset_file],
                                   api_name="save_preset")

        def load_preset(pname: str):
            if not pname or pname not in preset_names(preset_dir):
                raise gr.Error("pick a saved preset", print_exception=False)
            return self.fill_form(preset_dir / f"{pname}.yaml")

        self.preset_load_btn.click(load_preset, inputs=[self.preset_pick],
                                   outputs=[self.preset_msg, *self.field_comps], api_name="load_preset")

        def upload_preset(path):
            if not path:
                return [gr.skip()] * (1 + len(self.field_comps))
            return self.fill_form(path)

        self.preset_upload.upload(upload_preset, inputs=[self.preset_upload],
                                  outputs=[self.preset_msg, *self.field_comps], api_visibility="private")


# --- what TrainTab is made of ---------------------------------------------------------------------------
def _uploads_box() -> gr.File:
    """Images, and caption files named like their image (photo.png + photo.txt), in one upload box."""
    return gr.File(label="Training images (PNG, JPEG, WebP, BMP, TIFF) and, optionally, a caption for each: "
                         "photo.txt beside photo.png", file_count="multiple",
                   file_types=["image", ".txt", ".caption"], type="filepath", elem_id="uploads")


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


def _wire_plan(demo: gr.Blocks, runs_dir: Path, comps: dict, uploads, ab, run_plan) -> None:
    """Redraw the run plan whenever the form, the uploads or the A/B switch change, and on page load."""
    def redraw(ab_on: bool, files, **settings):
        return plan_view(runs_dir, ab_on, files, settings)

    triggers = [c.change for c in comps.values()] + [uploads.change, ab.change, demo.load]
    gr.on(triggers, redraw, inputs=[ab, uploads], inputs_kwargs=dict(comps), outputs=[run_plan],
          show_progress="hidden", trigger_mode="always_last", api_visibility="private")


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
