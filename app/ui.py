"""The Gradio page: puts the tabs together (Train, Runs, Compare) and wires what crosses from one tab to another.

Each tab is a module of its own: tab_train.py (form, presets, launch, live progress, queue, cancel),
tab_runs.py (the runs table; cancel, resume, rename, delete, download), tab_compare.py (runs side by side,
evaluation, generate now); tab_shared.py holds what they share. Every event handler is a thin function over
runs.py / submit.py / launcher.py / compare.py, and each one that a script may want has an api_name, so
gradio_client drives the same code paths as the page.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import compare
from .launcher import Launcher
from .runs import get_run
from .tab_compare import CompareTab
from .tab_runs import RunsTab, runs_table
from .tab_shared import user_error
from .tab_train import TrainTab, progress_html, queue_markdown


def build_app(runs_dir, launcher: Launcher, generator: compare.Generator | None = None,
              refresh_s: float = 1.0) -> gr.Blocks:
    runs_dir = Path(runs_dir).resolve()
    generator = generator or compare.Generator()

    # uploads and generated grids are Gradio's temporary files: dropped after a day
    with gr.Blocks(title="flatlora-diffusion", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("## flatlora-diffusion · DreamBooth LoRA with Flat-LoRA")
        # every tab's components first, inside the tabs; their events after, outside them (tab_train.py says why)
        with gr.Tabs(selected="train") as tabs:
            train = TrainTab(runs_dir)
            runs = RunsTab(runs_dir)
            compare_tab = CompareTab(runs_dir)
        train.wire(demo, launcher, refresh_s)
        # the Runs tab's slow timer also clears the Train tab's Launch message
        runs.wire(demo, launcher, refresh_s, launch_msg=train.launch_msg)
        _wire_reuse_settings(runs_dir, runs, train, tabs)
        compare_tab.wire(demo, launcher, generator, refresh_s)
    return demo


def _wire_reuse_settings(runs_dir: Path, runs: RunsTab, train: TrainTab, tabs: gr.Tabs) -> None:
    """Runs' "Use these settings in Train": the picked run's config.yaml fills the Train tab's form, and the
    page switches to that tab."""
    def reuse_settings(name: str | None):
        if not name:
            raise gr.Error("pick a run", print_exception=False)
        try:
            run = get_run(runs_dir, name)
        except KeyError as e:
            raise user_error(e) from None
        out = train.fill_form(run.path / "config.yaml")
        return [gr.Tabs(selected="train")] + out

    runs.run_reuse_btn.click(reuse_settings, inputs=[runs.run_pick],
                             outputs=[tabs, train.preset_msg, *train.field_comps], api_visibility="private")


__all__ = ["build_app", "progress_html", "queue_markdown", "runs_table"]
