"""Evaluation in the web app: the table and sharpness curves read from eval.json ('not evaluated' without it),
and `flatlora-diffusion evaluate <run>` as a queued child process, in first-come order with trainings; through
direct calls and through gradio_client. A stand-in CLI keeps it fast (the real command runs in the browser test)."""

import json
import socket
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from app import evaluations, submit
from app.chart import sharpness_svg
from app.eval_job import EvaluationRefused
from app.launcher import Launcher
from tests.test_app_launcher import wait_for
from app.runs import get_run
from flatlora_diffusion.tiny import make_subject_images
from tests.test_app_launcher import FAKE_TRAINER

RECORD = {"schema": "flatlora-diffusion/eval/1", "flat_sigma": 0.1,
          "loss": {"instance": 0.12, "heldout": 0.13, "gap": 0.01},
          "sharpness": {"split": "heldout", "points": [{"rho": 0.01, "mean_increase": 2e-6, "stderr": 1e-7},
                                                       {"rho": 0.1, "mean_increase": 2e-4, "stderr": 1e-5}]},
          "image_scores": {"subject": 0.875, "subject_new": 0.5, "class_collapse": 0.25}, "seconds": 3.0}

# `evaluate RUN` writes eval.json (or fails with one line); `train --config ...` is the launcher tests' stand-in
FAKE_CLI = textwrap.dedent(f'''
    import json, os, sys, time
    from pathlib import Path
    if sys.argv[1] == "evaluate":
        run = Path(sys.argv[2])
        (run / "evaluated_at").write_text(repr(time.time()))
        time.sleep(float(os.environ.get("FAKE_EVAL_DELAY", "0.1")))
        if os.environ.get("FAKE_EVAL") == "fail":
            print("error: the held-out folder is gone", file=sys.stderr, flush=True)
            sys.exit(2)
        (run / "eval.json").write_text(json.dumps({RECORD!r}))
        sys.exit(0)
''') + FAKE_TRAINER


@pytest.fixture
def env(tmp_path):
    cli = tmp_path / "fake_cli.py"
    cli.write_text(FAKE_CLI)
    images = make_subject_images(tmp_path / "images", n=1, size=32)[0].parent
    runs_dir = tmp_path / "runs"
    launchers = []

    def make(**env_vars):
        launcher = Launcher(runs_dir, trainer_command=[sys.executable, str(cli)], poll_s=0.05,
                            env={"FAKE_DELAY": "0.05", **env_vars})
        launchers.append(launcher)
        return launcher.start()

    def new_run(name, steps=2):
        return submit.prepare_runs(runs_dir, {"pretrained_model_name_or_path": "org/model",
                                              "instance_data_dir": str(images), "instance_prompt": "a photo of sks toy",
                                              "max_train_steps": steps}, name=name)[0]

    yield runs_dir, make, new_run
    for launcher in launchers:
        launcher.shutdown(cancel_running=True, timeout=10)


def _eval_state(runs_dir, name):
    return evaluations.eval_status(get_run(runs_dir, name)).get("state")


def test_table_rows_and_curves_come_from_eval_json(env):
    runs_dir, make, new_run = env
    launcher = make()
    launcher.submit([new_run("done"), new_run("fresh")])
    assert launcher.wait_idle(30)
    done, fresh = get_run(runs_dir, "done"), get_run(runs_dir, "fresh")
    (done.path / "eval.json").write_text(json.dumps(RECORD))
    headers, rows = evaluations.eval_table([done, fresh])
    assert headers[:6] == ["run", "evaluation", "sigma", "loss instance", "loss held-out", "gap"]
    assert headers[6:8] == ["Δ@ρ=0.01", "Δ@ρ=0.1"] and headers[8:] == ["subject", "subject_new", "class_collapse"]
    assert rows[0][:6] == ["done", "evaluated (heldout split)", "0.1", "0.1200", "0.1300", "0.0100"]
    assert rows[0][6:] == ["2.00e-06", "2.00e-04", "0.8750", "0.5000", "0.2500"]
    assert rows[1] == ["fresh", "not evaluated"] + [""] * (len(headers) - 2)
    # a broken eval.json is a run that is not evaluated, not a crash
    (fresh.path / "eval.json").write_text("{not json")
    assert evaluations.eval_table([fresh])[1] == [["fresh", "not evaluated", "", "", "", ""]]
    svg = sharpness_svg(evaluations.sharpness_series([done, fresh]))
    assert "data-lines='1'" in svg and svg.count("<polyline class='run'") == 1
    ET.fromstring(svg[svg.index("<svg"):svg.rindex("</svg>") + 6])  # well-formed
    assert "data-lines='0'" in sharpness_svg([]) and "<svg" not in sharpness_svg([])
    assert "data-scale='log'" in svg
    # a negative increase (weights away from a minimum) cannot sit on a log axis: a linear one shows it
    mixed = sharpness_svg([("r", [(0.01, -1e-7, None), (0.1, 1e-4, None)])])
    assert "data-scale='linear'" in mixed and mixed.count("<circle") == 2


def test_evaluation_is_queued_like_a_training_and_recorded(env):
    runs_dir, make, new_run = env
    launcher = make()
    first = new_run("first")
    launcher.submit([first])
    assert launcher.wait_idle(30)
    with pytest.raises(EvaluationRefused, match="only a finished run"):
        launcher.submit_evaluation(new_run("waiting"))  # queued for training, never started: not evaluable
    with pytest.raises(KeyError):
        launcher.submit_evaluation("nope")
    # a training submitted before the evaluation runs first: one job at a time, first come first served
    slow = new_run("slow", steps=10)
    launcher.submit([slow])
    assert launcher.submit_evaluation("first") == "first: evaluation queued"
    assert launcher.submit_evaluation("first").startswith("first: evaluation already waiting")
    assert _eval_state(runs_dir, "first") == "queued"
    assert launcher.eval_snapshot() == {"evaluating": None, "waiting": ["first"]}
    wait_for(lambda: _eval_state(runs_dir, "first") == "completed", timeout=30.0)
    slow_done = json.loads((runs_dir / "slow" / "status.json").read_text())["finished_at"]
    assert float((runs_dir / "first" / "evaluated_at").read_text()) >= slow_done
    assert evaluations.read_eval(get_run(runs_dir, "first"))["loss"]["gap"] == 0.01
    assert "starting: " in (runs_dir / "first" / "eval.log").read_text()
    # the training's own status is untouched by the evaluation
    assert json.loads((runs_dir / "first" / "status.json").read_text())["state"] == "completed"
    assert launcher.wait_idle(10)


def test_a_failed_evaluation_says_why_and_a_queued_one_can_be_cancelled(env):
    runs_dir, make, new_run = env
    launcher = make(FAKE_EVAL="fail", FAKE_EVAL_DELAY="0.5")
    launcher.submit([new_run("a"), new_run("b")])
    assert launcher.wait_idle(30)
    launcher.submit_evaluation("a")
    launcher.submit_evaluation("b")
    assert launcher.cancel_evaluation("b") == "b: evaluation removed from the queue"
    wait_for(lambda: _eval_state(runs_dir, "a") == "failed", timeout=30.0)
    status = evaluations.eval_status(get_run(runs_dir, "a"))
    assert status["message"] == "the evaluation stopped (exit code 2): error: the held-out folder is gone"
    assert _eval_state(runs_dir, "b") == "cancelled" and not (runs_dir / "b" / "evaluated_at").exists()
    rows = evaluations.eval_table([get_run(runs_dir, "a"), get_run(runs_dir, "b")])[1]
    assert rows[0][1] == "not evaluated (failed)" and rows[1][1] == "not evaluated (cancelled)"


def test_compare_tab_evaluates_through_gradio_client(env):
    import app
    from gradio_client import Client

    runs_dir, _, new_run = env
    names = [new_run("x"), new_run("y", steps=400)]
    demo, launcher = app.create_app(runs_dir, trainer_command=[sys.executable, str(runs_dir.parent / "fake_cli.py")],
                                    refresh_s=0.5)
    launcher.extra_env.update(FAKE_DELAY="0.05")
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            ssr_mode=False)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        launcher.submit(names)
        wait_for(lambda: get_run(runs_dir, "x").state == "completed", timeout=30.0)
        table, svg, msg = client.predict(runs=["x", "y"], api_name="/evaluations")
        assert [row[:2] for row in table["data"]] == [["x", "not evaluated"], ["y", "not evaluated"]]
        assert "data-lines='0'" in svg
        # y is still training: refused in words, x queued
        table, svg, msg = client.predict(runs=["x", "y"], api_name="/evaluate")
        assert "x: evaluation queued" in msg and "y is running; only a finished run can be evaluated" in msg
        launcher.cancel("y")
        wait_for(lambda: _eval_state(runs_dir, "x") == "completed", timeout=30.0)
        table, svg, msg = client.predict(runs=["x", "y"], api_name="/evaluations")
        assert table["data"][0][:4] == ["x", "evaluated (heldout split)", "0.1", "0.1200"]
        assert table["data"][1][:2] == ["y", "not evaluated"]
        assert "data-lines='1'" in svg and "**x**: evaluated (3 s)" in msg and "**y**: not evaluated" in msg
    finally:
        launcher.shutdown(cancel_running=True, timeout=10)
        demo.close()
