"""The web app's launcher under faults (issue #17): it adopts and signals only a provable trainer of a run,
starts at most one trainer per run folder, and its queue survives any error of one run. Against the
stand-in trainer of test_app_launcher.py, extended to record its starts and, like the real one, to hold the
run folder's trainer lock."""

import json
import os
import subprocess
import sys
import time

import pytest

from app import runs
from app.launcher import Launcher
from flatlora_diffusion.run_dir import TrainerLock, lock_holder
from tests.test_app_launcher import FAKE_TRAINER, env, state, wait_for  # noqa: F401 (env is a fixture)

LOCKING_TRAINER = FAKE_TRAINER.replace("START = time.time()\n", '''START = time.time()
with open(run / "starts", "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(float(os.environ.get("FAKE_START_DELAY", "0")))
import fcntl
_lock = os.open(run / "trainer.lock", os.O_RDWR | os.O_CREAT)
try:
    fcntl.flock(_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("error: another trainer holds this run folder", file=sys.stderr, flush=True)
    sys.exit(2)
os.ftruncate(_lock, 0)
os.write(_lock, str(os.getpid()).encode())
''', 1)
assert LOCKING_TRAINER != FAKE_TRAINER


@pytest.fixture
def lenv(env, tmp_path):
    runs_dir, make, new_runs = env
    (tmp_path / "fake_trainer.py").write_text(LOCKING_TRAINER)  # the launchers of `make` run this file
    return runs_dir, make, new_runs


def test_item3_a_stale_pid_of_an_unrelated_process_is_never_adopted_nor_killed(lenv):
    runs_dir, make, new_runs = lenv
    [a] = new_runs("stale", steps=1)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runs.Run(runs_dir / a).update_status(state="running", pid=bystander.pid)  # the pid was reused
        launcher = make().start()
        assert launcher.snapshot()["running"] is None
        assert state(runs_dir, a)["state"] == "failed"
        runs.Run(runs_dir / a).update_status(state="running", pid=bystander.pid)
        assert launcher.cancel(a) == f"{a}: cancelled"
        time.sleep(0.3)
        assert bystander.poll() is None  # still alive: Cancel did not kill it
    finally:
        bystander.kill()
        bystander.wait()


def test_item4_the_queue_survives_a_run_folder_deleted_while_training_and_a_full_disk(lenv, monkeypatch):
    import shutil

    runs_dir, make, new_runs = lenv
    launcher = make(delay=0.3).start()
    [a], [b], [c] = new_runs("doomed", steps=3), new_runs("full", steps=1), new_runs("after", steps=1)
    launcher.submit([a])
    wait_for(lambda: state(runs_dir, a)["state"] == "running")
    shutil.rmtree(runs_dir / a)  # the user deleted the folder while it trained
    wait_for(lambda: launcher.snapshot()["running"] is None, timeout=20)

    real = runs.Run.update_status
    failures = {"n": 0}

    def disk_full(self, **fields):
        if self.name == b and fields.get("state") == "failed" or (self.name == b and "pid" in fields):
            failures["n"] += 1
            raise OSError(28, "No space left on device")
        return real(self, **fields)

    monkeypatch.setattr(runs.Run, "update_status", disk_full)
    launcher.submit([b])
    wait_for(lambda: failures["n"] > 0, timeout=20)
    wait_for(lambda: launcher.snapshot()["running"] is None, timeout=20)
    monkeypatch.setattr(runs.Run, "update_status", real)
    launcher.submit([c])  # the queue is alive: the next run trains
    wait_for(lambda: state(runs_dir, c)["state"] == "completed", timeout=20)
    assert launcher._thread.is_alive()


def test_item8_an_app_restarted_before_the_trainers_first_status_write_does_not_start_a_second(lenv):
    runs_dir, make, new_runs = lenv
    first = Launcher(runs_dir, trainer_command=make().trainer_command, poll_s=0.05,
                     env={"FAKE_START_DELAY": "1.5", "FAKE_DELAY": "0.1"}).start()
    [a] = new_runs("once", steps=3)
    first.submit([a])
    wait_for(lambda: (runs_dir / a / "starts").exists())
    first.shutdown(cancel_running=False)  # the app crashed: status still "queued", the trainer importing
    assert state(runs_dir, a)["state"] == "queued"
    second = make(delay=0.1).start()
    assert second.snapshot()["running"] == a  # adopted (its command line names this run's config)
    assert second.wait_idle(30)
    assert state(runs_dir, a)["state"] == "completed"
    assert len((runs_dir / a / "starts").read_text().split()) == 1  # one trainer, ever


def test_item8_a_run_whose_lock_is_held_is_followed_not_started_again(lenv):
    runs_dir, make, new_runs = lenv
    [a] = new_runs("locked", steps=1)
    lock = TrainerLock(runs_dir / a).acquire()  # a trainer (this test) holds the folder
    try:
        launcher = make().start()
        launcher.submit([a])
        wait_for(lambda: launcher.snapshot()["running"] == a)
        assert lock_holder(runs_dir / a) == os.getpid()
        time.sleep(0.5)
        assert not (runs_dir / a / "starts").exists()  # no second trainer was started
    finally:
        lock.release()
    wait_for(lambda: launcher.snapshot()["running"] is None)
    assert state(runs_dir, a)["state"] == "failed"  # the holder ended without a final status
    assert json.loads((runs_dir / a / "status.json").read_text())["message"]


def test_the_app_with_the_real_trainer_killed_mid_run_marks_it_failed_and_goes_on(tiny, tmp_path):
    from app.submit import prepare_runs
    from tests.training_helpers import settings

    runs_dir = tmp_path / "runs"
    values = settings(tiny, None, output_dir=None, max_train_steps=3, checkpointing_steps=1)
    [a] = prepare_runs(runs_dir, values, name="killed")
    [b] = prepare_runs(runs_dir, {**values, "max_train_steps": 1}, name="next")
    launcher = Launcher(runs_dir, poll_s=0.1, env={"FLATLORA_FAULT": "kill@ckpt_state:2", "OMP_NUM_THREADS": "1",
                                                   "HF_HUB_OFFLINE": "1"}).start()
    try:
        launcher.submit([a, b])
        assert launcher.wait_idle(120)
    finally:
        launcher.shutdown(cancel_running=True)
    st = state(runs_dir, a)
    assert st["state"] == "failed" and "signal 9" in st["message"]
    assert lock_holder(runs_dir / a) is None
    assert [p.name for p in (runs_dir / a / "checkpoints").iterdir() if not p.name.endswith(".partial")] == \
        ["checkpoint-1"]
    assert state(runs_dir, b)["state"] == "completed"
