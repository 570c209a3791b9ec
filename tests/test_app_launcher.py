"""The launcher's queue, cancel and restart rules, against a stand-in trainer that writes the run-directory
contract (fast and scriptable: it can hang, ignore SIGTERM, fail, or leave a grandchild behind)."""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app import runs, submit
from app.launcher import Launcher
from flatlora_diffusion.tiny import make_subject_images

FAKE_TRAINER = textwrap.dedent('''
    import json, os, signal, subprocess, sys, time
    from pathlib import Path
    import yaml

    assert sys.argv[1:3] == ["train", "--config"], sys.argv
    cfg = yaml.safe_load(Path(sys.argv[3]).read_text())
    run = Path(cfg["output_dir"])
    mode = os.environ.get("FAKE_MODE", "ok")
    steps = int(cfg.get("max_train_steps") or 3)
    delay = float(os.environ.get("FAKE_DELAY", "0.05"))

    def status(state, step, **kw):
        st = {"state": state, "step": step, "total": steps, "message": kw.pop("message", ""), "pid": os.getpid(),
              "started_at": START, "updated_at": time.time(), "finished_at": kw.pop("finished_at", None),
              "eta_seconds": (steps - step) * delay}
        tmp = run / ".status.tmp"
        tmp.write_text(json.dumps(st))
        os.replace(tmp, run / "status.json")

    START = time.time()
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_term(*_):
            status("cancelled", 0, message="cancelled", finished_at=time.time())
            sys.exit(130)
        signal.signal(signal.SIGTERM, on_term)
    if mode == "spawn":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        (run / "grandchild.pid").write_text(str(child.pid))
    print("fake trainer starting", flush=True)
    if mode == "fail":
        print("error: --pretrained_model_name_or_path: no such model", file=sys.stderr, flush=True)
        sys.exit(2)
    status("running", 0)
    (run / "started").write_text(str(time.time()))
    for step in range(1, steps + 1):
        time.sleep(delay)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-4, "flat_sigma": cfg["flat_sigma"],
                                "seconds": time.time() - START, "it_per_s": 1 / delay, "epoch": 0}) + "\\n")
        status("running", step)
        print(f"step {step}", flush=True)
    if mode == "silent_exit":
        sys.exit(0)
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    status("completed", steps, message="done", finished_at=time.time())
    (run / "finished").write_text(str(time.time()))
''')


@pytest.fixture
def env(tmp_path):
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    images = make_subject_images(tmp_path / "images", n=1, size=32)[0].parent
    launchers = []

    def make(mode="ok", delay=0.05, grace=5.0):
        launcher = Launcher(tmp_path / "runs", trainer_command=[sys.executable, str(trainer)], kill_grace_s=grace,
                            poll_s=0.05, env={"FAKE_MODE": mode, "FAKE_DELAY": str(delay)})
        launchers.append(launcher)
        return launcher

    def new_runs(name, steps=3, ab=False):
        return submit.prepare_runs(tmp_path / "runs", {
            "pretrained_model_name_or_path": "org/model", "instance_data_dir": str(images),
            "instance_prompt": "a photo of sks toy", "max_train_steps": steps}, name=name, ab=ab)

    yield tmp_path / "runs", make, new_runs
    for launcher in launchers:
        launcher.shutdown(cancel_running=True, timeout=10)


def state(runs_dir, name):
    return json.loads((runs_dir / name / "status.json").read_text())


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_runs_train_one_at_a_time_in_order(env):
    runs_dir, make, new_runs = env
    launcher = make(delay=0.1).start()
    names = new_runs("ab", steps=4, ab=True) + new_runs("third", steps=2)
    launcher.submit(names)
    wait_for(lambda: launcher.snapshot()["running"] == "ab-lora")
    assert launcher.snapshot()["queued"] == ["ab-flat", "third"]
    assert launcher.position("third") == 2
    assert launcher.wait_idle(30)
    assert [state(runs_dir, n)["state"] for n in names] == ["completed"] * 3
    started = [float((runs_dir / n / "started").read_text()) for n in names]
    finished = [float((runs_dir / n / "finished").read_text()) for n in names]
    assert finished[0] <= started[1] and finished[1] <= started[2]  # never two at once
    log = (runs_dir / "ab-lora" / "train.log").read_text()
    assert "fake trainer starting" in log and "step 4" in log and "exited with code 0" in log


def test_cancel_stops_the_whole_process_tree(env):
    runs_dir, make, new_runs = env
    launcher = make(mode="spawn", delay=0.5).start()
    [a], [b] = new_runs("long", steps=200), new_runs("next", steps=1)
    launcher.submit([a, b])
    wait_for(lambda: (runs_dir / a / "grandchild.pid").exists() and state(runs_dir, a)["state"] == "running")
    grandchild = int((runs_dir / a / "grandchild.pid").read_text())
    pid = state(runs_dir, a)["pid"]
    assert launcher.cancel(a) == f"{a}: stopping"
    wait_for(lambda: state(runs_dir, a)["state"] == "cancelled")
    wait_for(lambda: not runs.pid_alive(grandchild) and not runs.pid_alive(pid), timeout=10)
    # the queue moves on to the next run
    wait_for(lambda: state(runs_dir, b)["state"] == "completed")


def test_a_trainer_that_ignores_sigterm_is_killed_and_marked_cancelled(env):
    runs_dir, make, new_runs = env
    launcher = make(mode="ignore_term", delay=0.5, grace=0.5).start()
    [a] = new_runs("stubborn", steps=200)
    launcher.submit([a])
    wait_for(lambda: state(runs_dir, a)["state"] == "running")
    launcher.cancel(a)
    wait_for(lambda: state(runs_dir, a)["state"] == "cancelled", timeout=10)
    assert state(runs_dir, a)["finished_at"]
    assert launcher.wait_idle(5)


def test_cancel_a_waiting_run_and_failures(env):
    runs_dir, make, new_runs = env
    launcher = make(mode="fail").start()
    [a], [b] = new_runs("bad"), new_runs("waiting")
    launcher.submit([a, b])
    assert launcher.cancel(b) in (f"{b}: removed from the queue", f"{b}: cancelled")
    assert launcher.wait_idle(20)
    st = state(runs_dir, a)
    assert st["state"] == "failed"
    assert "exit code 2" in st["message"] and "no such model" in st["message"]
    assert state(runs_dir, b)["state"] == "cancelled"
    assert not (runs_dir / b / "train.log").exists()  # it never started
    assert launcher.cancel(a) == f"{a}: already failed"


def test_a_trainer_that_exits_without_a_final_status_is_a_failure(env):
    runs_dir, make, new_runs = env
    launcher = make(mode="silent_exit").start()
    [a] = new_runs("silent", steps=1)
    launcher.submit([a])
    assert launcher.wait_idle(20)
    assert state(runs_dir, a)["state"] == "failed"


def test_a_new_app_adopts_the_running_trainer_and_requeues_waiting_runs(env):
    runs_dir, make, new_runs = env
    first = make(delay=0.2).start()
    [a], [b] = new_runs("adopted", steps=15), new_runs("later", steps=1)
    first.submit([a, b])
    wait_for(lambda: state(runs_dir, a)["state"] == "running")
    first.shutdown(cancel_running=False)  # the app goes away; the training does not
    time.sleep(0.3)
    assert state(runs_dir, a)["state"] == "running" and runs.pid_alive(state(runs_dir, a)["pid"])
    assert state(runs_dir, b)["state"] == "queued"

    # a crashed run from long ago: marked failed, not adopted
    [c] = new_runs("crashed", steps=1)
    runs.Run(runs_dir / c).update_status(state="running", pid=2**22 + 12345)

    second = make(delay=0.2).start()
    assert second.snapshot() == {"running": a, "queued": [b]}
    assert state(runs_dir, c)["state"] == "failed"
    assert "gone" in state(runs_dir, c)["message"]
    assert second.wait_idle(30)
    assert state(runs_dir, a)["state"] == "completed" and state(runs_dir, b)["state"] == "completed"


def test_cancel_an_adopted_run(env):
    runs_dir, make, new_runs = env
    first = make(delay=0.5).start()
    [a] = new_runs("orphan", steps=200)
    first.submit([a])
    wait_for(lambda: state(runs_dir, a)["state"] == "running")
    first.shutdown(cancel_running=False)
    pid = state(runs_dir, a)["pid"]
    second = make(delay=0.5).start()
    assert second.snapshot()["running"] == a
    second.cancel(a)
    wait_for(lambda: state(runs_dir, a)["state"] == "cancelled")
    wait_for(lambda: not runs.pid_alive(pid))
    assert second.wait_idle(10)


def test_child_gets_its_own_session(env):
    runs_dir, make, new_runs = env
    launcher = make(delay=0.5).start()
    [a] = new_runs("session", steps=200)
    launcher.submit([a])
    wait_for(lambda: state(runs_dir, a)["state"] == "running")
    pid = state(runs_dir, a)["pid"]
    assert os.getpgid(pid) == pid != os.getpgid(0)
    launcher.cancel(a)
    wait_for(lambda: state(runs_dir, a)["state"] == "cancelled")
    assert launcher.wait_idle(10)
    assert state(runs_dir, a)["message"] == "cancelled"
    assert Path(runs_dir / a / "train.log").read_text().count("[app]") == 2


def test_cancel_a_training_started_from_a_terminal(env, tmp_path):
    """A run started by hand (not leading a process group of its own) is adopted and can still be cancelled."""
    import subprocess

    runs_dir, make, new_runs = env
    [a] = new_runs("by-hand", steps=200)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "fake_trainer.py"), "train", "--config",
                             str(runs_dir / a / "config.yaml")], env={**os.environ, "FAKE_DELAY": "0.5"})
    try:
        wait_for(lambda: state(runs_dir, a)["state"] == "running")
        assert os.getpgid(proc.pid) != proc.pid
        launcher = make().start()
        assert launcher.snapshot()["running"] == a
        launcher.cancel(a)
        assert proc.wait(10) == 130  # its SIGTERM handler ran
        wait_for(lambda: state(runs_dir, a)["state"] == "cancelled")
        assert launcher.wait_idle(10)
    finally:
        if proc.poll() is None:
            proc.kill()
