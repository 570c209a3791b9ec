"""What more than one tab of the page uses: the run names a picker offers, an error the user reads, the js
that asks before a click acts.

The tab modules import this, never app.ui (which imports them).
"""

from __future__ import annotations

import gradio as gr

from .runs import list_runs


def run_names(runs_dir) -> list[str]:
    """The choices of every run picker (Train's followed run, Runs' run, Compare's runs), newest first."""
    return [r.name for r in list_runs(runs_dir)]


def user_error(e: Exception) -> gr.Error:
    """An error shown in the page as its first line, without a traceback in the server's log."""
    return gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__, print_exception=False)


def confirm_js(question: str) -> str:
    """A click handler's js: asks `question` (${name} = the first input) in the browser and passes the answer
    as the second input; the handler does nothing when it is no."""
    return ("(name, _ok) => [name, name ? window.confirm(`" + question.replace("`", "'") + "`) : false]")
