"""The Runs tab: the table of every run, and what can be done to one picked run (its metrics, config.yaml and
LoRA files; cancel, resume, rename, delete); also the scripts' `files`, `delete_run` and `rename_run`.

RunsTab(...) makes the components (inside the page's gr.Tabs), RunsTab.wire gives them their events afterwards
(tab_train.py says why these are two steps). "Use these settings in Train" is wired by app.ui.build_app, since
it fills the Train tab's form.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from flatlora_diffusion.config import ConfigError

from . import downloads, manage
from .launcher import Launcher
from .runs import get_run, list_runs
from .tab_shared import confirm_js, run_names, user_error

RUNS_HEADERS = ["run", "state", "step", "flat_sigma", "A/B group", "final loss", "size on disk", "message"]


def runs_table(runs_dir) -> list[list]:
    rows = []
    for run in list_runs(runs_dir):
        s = run.summary()
        rows.append([s["run"], s["state"], f"{s['step']}/{s['total']}", s["flat_sigma"], s["ab_group"] or "",
                     s["final_loss"], manage.format_size(manage.disk_usage(run.path)), s["message"]])
    return rows


class RunsTab:
    """The Runs tab: its components (made by __init__, inside the page's gr.Tabs) and their events (wire)."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        with gr.Tab("Runs", id="runs", elem_id="tab-runs") as self.gr_tab:
            with gr.Row():
                self.runs_refresh = gr.Button("Refresh", scale=0)
            self.runs_df = gr.Dataframe(headers=RUNS_HEADERS, value=runs_table(runs_dir), interactive=False,
                                        elem_id="runs-table")
            with gr.Row():
                self.run_pick = gr.Dropdown(choices=run_names(runs_dir), label="run", scale=2, elem_id="run-pick",
                                            allow_custom_value=True)
                self.run_cancel_btn = gr.Button("Cancel run", variant="stop", scale=0)
                self.run_resume_btn = gr.Button("Resume from last checkpoint", scale=0)
                # wired by app.ui.build_app: it fills the Train tab's form
                self.run_reuse_btn = gr.Button("Use these settings in Train", scale=0)
            with gr.Row():
                self.rename_to = gr.Textbox(label="New name", scale=2, elem_id="rename-to")
                self.run_rename_btn = gr.Button("Rename run", scale=0, elem_id="rename-run")
                self.run_delete_btn = gr.Button("Delete run", variant="stop", scale=0, elem_id="delete-run")
            self.run_msg = gr.Markdown(elem_id="run-msg")
            with gr.Row():
                self.dl_kohya = gr.DownloadButton("kohya file (ComfyUI / A1111)", visible=False,
                                                  elem_id="dl-kohya")
                self.dl_diffusers = gr.DownloadButton("diffusers file", visible=False, elem_id="dl-diffusers")
            with gr.Row():
                self.run_summary = gr.JSON(label="metrics")
                self.run_settings = gr.Code(label="config.yaml", language="yaml", interactive=False)

    def wire(self, demo: gr.Blocks, launcher: Launcher, refresh_s: float, launch_msg) -> None:
        """The table and the picked run's details, kept up to date; cancel, resume, rename, delete. The tab's
        slow timer also clears `launch_msg` (the Train tab's message) a while after it was shown."""
        runs_dir, runs_df, run_pick, run_msg = self.runs_dir, self.runs_df, self.run_pick, self.run_msg

        def refresh_runs(current: str | None):
            names = run_names(runs_dir)
            value = current if current in names else names[0] if names else None
            return runs_table(runs_dir), gr.Dropdown(choices=names, value=value)

        def run_details(name: str | None):
            if not name:
                return ({}, "", gr.DownloadButton(visible=False), gr.DownloadButton(visible=False), gr.skip())
            try:
                run = get_run(runs_dir, name)
            except KeyError as e:
                raise user_error(e) from None
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

        details_outputs = [self.run_summary, self.run_settings, self.dl_kohya, self.dl_diffusers, run_msg]
        run_pick.change(run_details, inputs=[run_pick], outputs=details_outputs, api_visibility="private")

        def pick_row(evt: gr.SelectData):
            row = evt.row_value or []
            return gr.Dropdown(choices=run_names(runs_dir), value=row[0]) if row else gr.skip()

        runs_df.select(pick_row, outputs=[run_pick], api_visibility="private")
        for trigger in (self.runs_refresh.click, self.gr_tab.select, demo.load):
            trigger(refresh_runs, inputs=[run_pick], outputs=[runs_df, run_pick], api_visibility="private").then(
                run_details, inputs=[run_pick], outputs=details_outputs, api_visibility="private")
        runs_timer = gr.Timer(max(4 * refresh_s, 2.0))
        _wire_runs_autorefresh(runs_dir, runs_timer, runs_df, run_pick)
        _wire_runs_admin(runs_dir, launcher, run_pick, self.rename_to, self.run_rename_btn, self.run_delete_btn,
                         run_msg, runs_df, refresh_runs)
        _expire_message(run_msg, runs_timer, after_s=max(10 * refresh_s, 5.0))
        _expire_message(launch_msg, runs_timer, after_s=max(10 * refresh_s, 5.0))

        def run_files(run: str) -> tuple:
            try:
                files = get_run(runs_dir, run).exports()
            except KeyError as e:
                raise user_error(e) from None
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
                raise user_error(e) from None

        self.run_cancel_btn.click(cancel_run, inputs=[run_pick], outputs=[run_msg], api_visibility="private")

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
                raise user_error(e) from None
            return f"{name}: queued to resume from its last checkpoint."

        self.run_resume_btn.click(resume_run, inputs=[run_pick], outputs=[run_msg], api_visibility="private")


def _wire_runs_autorefresh(runs_dir: Path, timer: gr.Timer, runs_df, run_pick) -> None:
    """The Runs table and the run picker follow the runs folder by themselves (sent only when they changed,
    so a row being read is not redrawn every few seconds)."""
    shown = gr.State(None)

    def tick(last):
        rows = runs_table(runs_dir)
        if rows == last:
            return gr.skip(), gr.skip(), last
        # choices only: the value read when the tick started may be older than the user's pick by now
        return rows, gr.Dropdown(choices=run_names(runs_dir)), rows

    timer.tick(tick, inputs=[shown], outputs=[runs_df, run_pick, shown], show_progress="hidden",
               concurrency_limit=None, api_visibility="private")


def _wire_runs_admin(runs_dir: Path, launcher: Launcher, run_pick, rename_to, rename_btn, delete_btn, run_msg,
                     runs_df, refresh_runs) -> None:
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
        return f"Renamed {name} to **{new}**.", gr.Dropdown(choices=run_names(runs_dir), value=new)

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
