"""The Compare tab: two or more runs side by side (validation images by step and the LoRA files of that step,
loss curves, settings and metrics, the final LoRA files), their evaluation (queued here, its table and
sharpness curves), and images generated now with their LoRAs; also the scripts' `compare`, `evaluations`,
`evaluate` and `generate`.

CompareTab(...) makes the components (inside the page's gr.Tabs), CompareTab.wire gives them their events
afterwards (tab_train.py says why these are two steps).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import chart, compare, compare_table, downloads, evaluations
from .eval_job import EvaluationRefused
from .launcher import Launcher
from .runs import Run, get_run, list_runs
from .tab_shared import run_names, user_error


def loss_chart(runs: list[Run]) -> str:
    return chart.loss_svg(compare.loss_series(runs))


class CompareTab:
    """The Compare tab: its components (made by __init__, inside the page's gr.Tabs) and their events (wire)."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        with gr.Tab("Compare", id="compare", elem_id="tab-compare") as self.gr_tab:
            with gr.Row():
                self.cmp_runs = gr.Dropdown(choices=run_names(runs_dir), multiselect=True, scale=3,
                                            allow_custom_value=True, label="runs to compare (two or more)",
                                            elem_id="cmp-runs")
                self.cmp_refresh = gr.Button("Refresh", scale=0)
            self.cmp_step = gr.Slider(minimum=0, maximum=1, step=1, value=0,
                                      label="step (of the runs' columns; the base-model column shows step 0)",
                                      elem_id="cmp-step")
            self.cmp_info = gr.Markdown(elem_id="cmp-info")
            self.cmp_grid = gr.Image(label="validation images", type="pil", format="png", interactive=False,
                                     elem_id="cmp-grid")
            self.cmp_step_files = gr.File(label="LoRA of the shown step, per run (named <run>_step<N>_<format>)",
                                          file_count="multiple", interactive=False, elem_id="cmp-step-files")
            self.cmp_step_note = gr.Markdown(elem_id="cmp-step-note")
            self.cmp_loss = gr.HTML(label="loss", elem_id="cmp-loss")
            with gr.Row():
                self.cmp_table_note = gr.Markdown(elem_id="cmp-table-note")
                self.cmp_all_settings = gr.Checkbox(label="show all settings", value=False, scale=0,
                                                    elem_id="cmp-all-settings")
            self.cmp_table = gr.Dataframe(label="settings and metrics", interactive=False, elem_id="cmp-table")
            self.cmp_files = gr.File(label="final LoRA files of the selected runs (named <run>_<format>)",
                                     file_count="multiple", interactive=False, elem_id="cmp-files")
            with gr.Accordion("Evaluation: held-out loss, sharpness, image scores", open=True):
                with gr.Row():
                    self.cmp_eval_btn = gr.Button("Evaluate selected runs", scale=0, elem_id="cmp-eval-btn")
                    self.cmp_eval_cancel = gr.Button("Cancel their evaluation", scale=0)
                self.cmp_eval_msg = gr.Markdown(elem_id="cmp-eval-msg")
                self.cmp_eval_table = gr.Dataframe(label="evaluation (each run's eval.json)", interactive=False,
                                                   elem_id="cmp-eval")
                self.cmp_sharp = gr.HTML(label="sharpness", elem_id="cmp-sharp")
            with gr.Accordion("Generate now", open=True):
                with gr.Row():
                    self.gen_prompt = gr.Textbox(label="prompt", scale=3, elem_id="gen-prompt")
                    self.gen_negative = gr.Textbox(label="negative prompt", scale=2)
                with gr.Row():
                    self.gen_seed = gr.Number(label="seed", value=0, precision=0)
                    self.gen_strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA strength")
                    self.gen_steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                    self.gen_guidance = gr.Slider(1.0, 15.0, value=7.0, step=0.5, label="guidance scale")
                    self.gen_base = gr.Checkbox(label="include the base model", value=True)
                self.gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-btn")
                self.gen_image = gr.Image(label="generated", type="pil", format="png", interactive=False,
                                          elem_id="gen-image")

    def wire(self, demo: gr.Blocks, launcher: Launcher, generator: compare.Generator, refresh_s: float) -> None:
        """The selection, the step slider and what they draw; evaluation; Generate now."""
        runs_dir, cmp_runs = self.runs_dir, self.cmp_runs  # the selection: the input of nearly every event

        # -------------------------------------------------------------- the selection, the step, what they draw
        def _picked(names) -> list[Run]:
            runs = []
            for n in names or []:
                try:
                    runs.append(get_run(runs_dir, n))
                except KeyError as e:
                    raise user_error(e) from None
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

        step_outputs = [self.cmp_grid, self.cmp_info, self.cmp_step_files, self.cmp_step_note]
        cmp_outputs = [self.cmp_grid, self.cmp_info, self.cmp_loss, self.cmp_table, self.cmp_files, self.cmp_step_files,
                       self.cmp_step_note, self.cmp_table_note]
        eval_outputs = [self.cmp_eval_table, self.cmp_sharp, self.cmp_eval_msg]
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
        cmp_runs.change(pick_runs, inputs=[cmp_runs, self.cmp_all_settings, cmp_at],
                        outputs=[self.cmp_step, self.cmp_loss, self.cmp_table, self.cmp_files, self.cmp_table_note,
                                 cmp_at, *eval_outputs],
                        api_visibility="private").then(
            draw, inputs=[cmp_runs, cmp_at], outputs=step_outputs, concurrency_id="cmp-grid",
            trigger_mode="always_last", api_visibility="private")  # "once" dropped a draw while one was pending
        # a step typed into the slider's number box fires input (Enter does not blur, so no release comes);
        # dragging fires input all along and release at the end: the newest value wins
        gr.on([self.cmp_step.input, self.cmp_step.release], move_step, inputs=[cmp_runs, self.cmp_step],
              outputs=[*step_outputs, cmp_at], trigger_mode="always_last", show_progress="hidden",
              concurrency_id="cmp-grid", api_visibility="private")
        # for scripts: the slider's bounds follow the selected runs, so the API takes the step as a plain number
        cmp_step_api = gr.Number(visible=False, precision=0)
        cmp_api_btn = gr.Button(visible=False)
        cmp_api_btn.click(compare_runs, inputs=[cmp_runs, cmp_step_api, self.cmp_all_settings], outputs=cmp_outputs,
                          api_name="compare")
        self.cmp_all_settings.change(table_view, inputs=[cmp_runs, self.cmp_all_settings],
                                     outputs=[self.cmp_table, self.cmp_table_note], api_visibility="private")
        self.cmp_refresh.click(lambda: gr.Dropdown(choices=run_names(runs_dir)), outputs=[cmp_runs],
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

        # -------------------------------------------------------------- evaluation
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
                    raise user_error(e) from None
            table, svg, status = evaluation_view(runs)
            return table, svg, "  \n".join(said) + "  \n" + status

        self.cmp_eval_btn.click(evaluate_runs, inputs=[cmp_runs], outputs=eval_outputs, api_name="evaluate")

        def cancel_evaluations(runs: list[str]):
            said = [launcher.cancel_evaluation(r.name) for r in _picked(runs)]
            table, svg, status = evaluation_view(runs)
            return table, svg, "  \n".join(said + [status])

        self.cmp_eval_cancel.click(cancel_evaluations, inputs=[cmp_runs], outputs=eval_outputs,
                                   api_visibility="private")

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
        self.gr_tab.select(default_compare, inputs=[cmp_runs], outputs=[cmp_runs], api_visibility="private")

        # -------------------------------------------------------------- generate now
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
                raise user_error(e) from None

        self.gen_btn.click(generate_now,
                           inputs=[cmp_runs, self.gen_prompt, self.gen_negative, self.gen_seed, self.gen_strength,
                                   self.gen_steps, self.gen_guidance, self.gen_base],
                           outputs=[self.gen_image], api_name="generate")
