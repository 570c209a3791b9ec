"""Nothing lost, ever (issue #17): each way a run or the app could lose work, hang or end in a traceback,
checked on tiny offline models (64 px, CPU). The seeded SIGKILL schedule is in test_fault_injection.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flatlora_diffusion import cli
from flatlora_diffusion.config import ConfigError, config_from_args, load_yaml

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # what came before
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ==========================================================================================================
# 9. every numeric setting has a range, in the one definition (flags, YAML and the web form all get it)
# ==========================================================================================================
BASE = ["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", "/nonexistent"]


@pytest.mark.parametrize("flag,value,fragment", [
    ("--max_grad_norm", "-1", "--max_grad_norm must be > 0"),
    ("--learning_rate", "nan", "--learning_rate must be a finite number"),
    ("--learning_rate", "inf", "--learning_rate must be a finite number"),
    ("--lr_warmup_steps", "-5", "--lr_warmup_steps must be in [0"),
    ("--flat_sigma", "50", "--flat_sigma must be in [0, 1]"),
    ("--resolution", "1000000", "--resolution must be in [8, 8192]"),
    ("--rank", "100000", "--rank must be in [1, 1024]"),
    ("--adam_beta1", "2", "--adam_beta1 must be in [0, 1)"),
    ("--seed", "-1", "--seed must be in [0, 4294967295]"),
    ("--dataloader_num_workers", "-2", "--dataloader_num_workers must be in [0, 256]"),
    ("--text_encoder_lr", "-1e-4", "--text_encoder_lr"),
    ("--adam_epsilon", "0", "--adam_epsilon"),
])
def test_numeric_settings_out_of_range_are_refused_by_flag_yaml_and_form(tmp_path, flag, value, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        config_from_args(BASE + [flag, value])
    assert fragment in str(e.value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{flag[2:]}: {value if value not in ('nan', 'inf') else '.' + value}\n")
    with pytest.raises(ConfigError) as e:
        config_from_args(BASE + ["--config", str(cfg)])
    assert fragment in str(e.value)
    from app.submit import prepare_runs  # the web form goes through make_config too

    with pytest.raises(ConfigError) as e:
        prepare_runs(tmp_path / "runs", {"pretrained_model_name_or_path": "org/model", "dataset_name": "x/y",
                                         flag[2:]: float(value) if "." in value or value in ("nan", "inf") or "e" in value
                                         else int(value)})
    assert fragment in str(e.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_abbreviated_and_empty_flags_are_refused(capsys):
    err = _one_line_error(capsys, ["train", *BASE, "--learning_rat", "1e-4"])
    assert "unknown flag --learning_rat; did you mean --learning_rate?" in err
    err = _one_line_error(capsys, ["train", *BASE, "--output_dir", ""])
    assert "--output_dir must name a folder" in err


# ==========================================================================================================
# 6. YAML: no aliases ("billion laughs"), bounded size
# ==========================================================================================================
BILLION_LAUGHS = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
    f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(8)) + "instance_prompt: *i\n"


def test_yaml_aliases_and_huge_files_are_refused_by_train_config_and_preset_upload(tmp_path, capsys):
    evil = tmp_path / "evil.yaml"
    evil.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 1500
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml(evil)
    err = _one_line_error(capsys, ["train", "--config", str(evil)])
    assert "aliases" in err
    from app.form import load_preset

    with pytest.raises(ConfigError, match="aliases"):
        load_preset(evil)
    big = tmp_path / "big.yaml"
    big.write_text("instance_prompt: '" + "x" * (2 * 1024 * 1024) + "'\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_yaml(big)
    # an anchor without alias is harmless and still fine
    ok = tmp_path / "ok.yaml"
    ok.write_text("rank: &r 8\n")
    assert load_yaml(ok) == {"rank": 8}


# ==========================================================================================================
# trainer faults, in process (an injected error is an exception here; the SIGKILL schedule is a subprocess)
# ==========================================================================================================
import errno  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402

from flatlora_diffusion import faults  # noqa: E402
from flatlora_diffusion.train import TrainingDiverged  # noqa: E402
from tests.training_helpers import lora_weights, metrics, run, settings  # noqa: E402


@pytest.fixture
def inject(monkeypatch):
    """inject("enospc@ckpt_state:2") arms the trainer's fault hook for this test."""
    def arm(spec):
        monkeypatch.setattr(faults, "hit", faults._make_hit(faults._parse(spec)))
    yield arm


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted 4-step run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(tiny, out, checkpointing_steps=1)
    return lora_weights(out)


def assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def no_leftovers(out: Path):
    stray = [p for p in out.rglob("*") if p.name.endswith((".partial", ".deleting", ".tmp"))]
    assert not stray, stray


def steps_once(out):
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def test_item1_a_failed_save_with_a_limit_keeps_the_previous_checkpoint(tiny, tmp_path, inject, reference):
    out = tmp_path / "run"
    inject("enospc@ckpt_state:2")  # the 2nd checkpoint's files are written, it is not published yet
    with pytest.raises(OSError):
        run(tiny, out, checkpointing_steps=1, checkpoints_total_limit=1)
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".partial")] == ["checkpoint-1"]
    inject("")
    run(tiny, out, checkpointing_steps=1, checkpoints_total_limit=1, resume_from_checkpoint="latest")
    assert_same(lora_weights(out), reference)
    steps_once(out)
    no_leftovers(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]


def test_item2_nan_weights_are_never_published_and_the_last_good_state_is_named(tiny, tmp_path, inject, reference):
    out = tmp_path / "run"
    inject("nan@step:2")  # step 2's update diverges; its loss was still finite
    with pytest.raises(TrainingDiverged) as e:
        run(tiny, out, checkpointing_steps=1, checkpoints_total_limit=1)
    assert "checkpoint-1" in str(e.value) and "step 2" in str(e.value)
    assert "bf16" not in str(e.value)  # fp32 run: the fp16 hint would be wrong
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "checkpoint-1" in status["message"]
    inject("")
    run(tiny, out, checkpointing_steps=1, checkpoints_total_limit=1, resume_from_checkpoint="latest")
    assert_same(lora_weights(out), reference)
    steps_once(out)


def test_item2_a_nan_lora_file_is_never_written(tiny, tmp_path, inject):
    out = tmp_path / "run"
    inject("nan@step:4")  # the last step: no checkpoint, the LoRA files are next
    with pytest.raises(TrainingDiverged):
        run(tiny, out)
    assert not list(out.glob("*.safetensors"))


def test_item5_torn_metrics_and_status_files_do_not_stop_a_resume(tiny, tmp_path, reference):
    out = tmp_path / "run"
    run(tiny, out, checkpointing_steps=2)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:9])  # a failed append
    (out / "status.json").write_text('{"state": "runn')  # a torn write of another tool
    for p in out.glob("*.safetensors"):
        p.unlink()
    run(tiny, out, checkpointing_steps=2, resume_from_checkpoint="latest")
    assert_same(lora_weights(out), reference)
    steps_once(out)
    from flatlora_diffusion.run_dir import RunDir

    rd = RunDir(out)  # an append after a torn line starts a line of its own
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    rd.append_metrics({"step": 3})
    assert [m["step"] for m in rd.read_metrics()] == [1, 3]


def _tree(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_item7_an_existing_run_is_refused_resumed_or_overwritten_never_damaged(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny, out, max_train_steps=2)
    before = _tree(out)
    argv = ["train", "--pretrained_model_name_or_path", str(tiny["sd15"]), "--instance_data_dir", str(tiny["images"]),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", "2", "--seed", "8"]
    err = _one_line_error(capsys, argv)
    assert "already holds a run (completed, step 2 of 2)" in err and "--overwrite" in err
    assert _tree(out) == before  # nothing written: config, status, metrics as they were
    # a resume with another seed or rank is another run
    err = _one_line_error(capsys, argv + ["--resume_from_checkpoint", "latest"])
    assert "--seed 7, not 8" in err
    assert _tree(out) == before
    assert cli.main(argv + ["--overwrite"]) == 0
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert yaml_load(out / "config.yaml")["seed"] == 8 and yaml_load(out / "config.yaml")["overwrite"] is False
    assert [m["step"] for m in metrics(out)] == [1, 2]


def yaml_load(p):
    import yaml

    return yaml.safe_load(Path(p).read_text())


def test_item7_the_apps_queued_run_folder_is_trained(tiny, tmp_path, capsys):
    from app.submit import prepare_runs

    [name] = prepare_runs(tmp_path / "runs", settings(tiny, None, max_train_steps=1, output_dir=None))
    cfg = tmp_path / "runs" / name / "config.yaml"
    assert cli.main(["train", "--config", str(cfg)]) == 0
    assert json.loads((cfg.parent / "status.json").read_text())["state"] == "completed"


def test_item10_a_full_disk_records_the_run_as_failed_with_one_line(tiny, tmp_path, inject, monkeypatch, capsys):
    out = tmp_path / "run"
    real_write_text = Path.write_text
    full = {"on": False}

    def write_text(self, *a, **k):  # once the disk is full, no new file can be written either
        if full["on"] and self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    real_hit = faults._make_hit(faults._parse("enospc@metrics:3"))
    seen = {"metrics": 0}

    def hit(point):
        if point == "metrics":
            seen["metrics"] += 1
            full["on"] = seen["metrics"] >= 3  # from the failing append on, nothing new can be written
        return real_hit(point)

    monkeypatch.setattr(faults, "hit", hit)
    argv = ["train", "--pretrained_model_name_or_path", str(tiny["sd15"]), "--instance_data_dir", str(tiny["images"]),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", "4", "--seed", "7", "--checkpointing_steps", "1"]
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and err.count("error: ") == 1
    line = err[err.index("error: "):].splitlines()[0]
    assert "No space left on device" in line and "checkpoint-2" in line
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "No space left" in status["message"]


def test_a_corrupt_or_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tiny, tmp_path, inject, reference,
                                                                                 caplog):
    out = tmp_path / "run"
    run(tiny, out, checkpointing_steps=1)
    for p in out.glob("*.safetensors"):
        p.unlink()
    lora = out / "checkpoints" / "checkpoint-3" / "lora_0.safetensors"
    lora.write_bytes(lora.read_bytes()[:-100])  # truncated (a copy or a disk that lost its tail)
    inject("eio@ckpt_read:1")  # and checkpoint-2 cannot be read: EIO
    with caplog.at_level("WARNING", logger="flatlora_diffusion"):
        run(tiny, out, checkpointing_steps=1, resume_from_checkpoint="latest")
    said = caplog.text
    assert "checkpoint-3 cannot be resumed from" in said and "105048 were written" in said
    assert "cannot load checkpoint-2" in said and "falling back to checkpoint-1" in said
    assert_same(lora_weights(out), reference)
    steps_once(out)


def test_resume_with_another_rank_is_refused_in_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny, out, max_train_steps=2, checkpointing_steps=1)
    state = json.loads((out / "checkpoints" / "checkpoint-1" / "training_state.json").read_text())
    argv = ["train", "--config", str(out / "config.yaml"), "--rank", "8", "--resume_from_checkpoint", "checkpoint-1"]
    err = _one_line_error(capsys, argv)
    assert "--rank 4, not 8" in err
    # a checkpoint of an older version has no settings: the load itself fails, in one line
    del state["settings"]
    (out / "checkpoints" / "checkpoint-1" / "training_state.json").write_text(json.dumps(state))
    (out / "config.yaml").rename(out / "config.yaml.bak")
    err = _one_line_error(capsys, ["train", "--config", str(out / "config.yaml.bak"), "--rank", "8",
                                   "--resume_from_checkpoint", "checkpoint-1"])
    assert "cannot resume from" in err and "size mismatch" in err


def test_a_resume_goes_on_with_the_lr_schedule_of_a_checkpoint_from_another_number_of_processes(tiny, tmp_path):
    """accelerate ticks the scheduler once per process per step, so checkpoint-2 of a 2-process run holds tick 4
    (emulated here by editing its scheduler state). Resumed on one process, the learning rates of steps 3 and 4
    are those of an uninterrupted one-process run, not the ones two steps further down the cosine."""
    out = tmp_path / "run"
    schedule = {"lr_scheduler": "cosine", "lr_warmup_steps": 1, "checkpointing_steps": 2}
    run(tiny, out, **schedule)
    uninterrupted = [m["lr"] for m in metrics(out)]
    assert len(set(uninterrupted)) == 4  # every step's rate differs: a shift would show
    state_file = out / "checkpoints" / "checkpoint-2" / "scheduler.bin"
    state = torch.load(state_file, weights_only=False)
    assert state["last_epoch"] == 2
    state["last_epoch"], state["_step_count"] = 4, 5
    torch.save(state, state_file)
    run(tiny, out, resume_from_checkpoint="checkpoint-2", **schedule)
    assert [m["lr"] for m in metrics(out)] == uninterrupted


def test_one_trainer_per_run_folder(tiny, tmp_path, capsys):
    from flatlora_diffusion.run_dir import TrainerLock, lock_holder

    out = tmp_path / "run"
    out.mkdir()
    lock = TrainerLock(out).acquire()
    try:
        assert lock_holder(out) == os.getpid()
        before = _tree(out)
        err = _one_line_error(capsys, ["train", *settings_argv(tiny, out)])
        assert f"is being trained by pid {os.getpid()}" in err
        assert _tree(out) == before
    finally:
        lock.release()
    assert lock_holder(out) is None


def settings_argv(tiny, out, **over):
    argv = []
    for k, v in settings(tiny, out, **over).items():
        argv += [f"--{k}", str(v)]
    return argv


def test_sigterm_during_validation_images_cancels_promptly(tiny, tmp_path):
    import signal
    import threading
    import time

    from flatlora_diffusion.train import Cancelled

    out = tmp_path / "run"
    sent = {}

    def cancel_when_sampling():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if "validation" in json.loads((out / "status.json").read_text()).get("message", ""):
                    time.sleep(0.3)
                    sent["at"] = time.monotonic()
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    threading.Thread(target=cancel_when_sampling, daemon=True).start()
    with pytest.raises(Cancelled):
        run(tiny, out, validation_prompt=["a photo of sks toy"], validation_seeds=[0],
            validation_inference_steps=1000)  # ~30 s of sampling if Cancel were not heard
    assert time.monotonic() - sent["at"] < 5
    assert json.loads((out / "status.json").read_text())["state"] == "cancelled"


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def test_ctrl_c_in_the_demo_saves_both_runs_and_says_so_in_one_line(tmp_path):
    """Ctrl-C reaches the terminal's whole process group: the demo, its fork server and both runs. Each run saves
    its step and the demo exits 130 with one line, not the runs' tracebacks passed up through the process pool."""
    import signal
    import time

    out = tmp_path / "demo"
    env = {k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"}  # as a user runs it: side by side on 2+ cores
    proc = subprocess.Popen([sys.executable, "-m", "flatlora_diffusion.cli", "demo", "--output", str(out),
                             "--steps", "400"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        metrics = [out / "lora" / "metrics.jsonl", out / "flat-lora" / "metrics.jsonl"]
        while not all(m.is_file() and len(m.read_text().splitlines()) >= 2 for m in metrics):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read()
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("demo cancelled: ")
    for name in ("lora", "flat-lora"):
        status = json.loads((out / name / "status.json").read_text())
        assert status["state"] == "cancelled" and 2 <= status["step"] < 400
        assert (out / name / "checkpoints" / f"checkpoint-{status['step']}").is_dir()


def test_a_trainer_stuck_in_a_native_call_still_obeys_sigterm(tiny, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "flatlora_diffusion.cli", "train", *settings_argv(tiny, out),
                             "--validation_prompt", "x", "--num_validation_images", "1",
                             "--validation_inference_steps", "1"],
                            env=_env(FLATLORA_FAULT="hang@validation:1", FLATLORA_CANCEL_GRACE_S="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "samples").glob("step_000000.partial/*.png")):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((out / "status.json").read_text())["state"] == "cancelled"


@pytest.mark.parametrize("damage", ["no_unet", "truncated_unet", "no_text_encoder_config"])
def test_a_damaged_model_folder_is_one_line_before_anything_is_written(tiny, tmp_path, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny["sd15"], model)
    if damage == "no_unet":
        shutil.rmtree(model / "unet")
        fragment = "unet/ is missing"
    elif damage == "truncated_unet":
        w = next((model / "unet").glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        fragment = "is truncated"
    else:
        (model / "text_encoder" / "config.json").unlink()
        fragment = "text_encoder/config.json is missing"
    out = tmp_path / "out"
    err = _one_line_error(capsys, ["train", *settings_argv(tiny, out, pretrained_model_name_or_path=str(model))])
    assert fragment in err
    assert not out.exists()


def test_export_refuses_nan_loras_and_never_replaces_a_device(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    run(tiny, out, max_train_steps=1)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert cli.main(["export", str(out), "--output", "/dev/null", "--overwrite"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    first = next(iter(weights))
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, tmp_path / "nan.safetensors")
    assert cli.main(["export", str(tmp_path / "nan.safetensors")]) == 2
    assert "NaN/inf" in capsys.readouterr().err
    assert not (tmp_path / "nan_kohya.safetensors").exists()


def test_the_trainer_lock_is_not_kept_by_forked_children(tmp_path):
    from flatlora_diffusion.run_dir import TrainerLock, lock_holder

    lock = TrainerLock(tmp_path).acquire()
    pid = os.fork()
    if pid == 0:  # a dataloader worker: it must not hold the lock
        os._exit(0 if lock.fd is None else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert lock_holder(tmp_path) == os.getpid()
    lock.release()
    assert lock_holder(tmp_path) is None


# ==========================================================================================================
# issue 16, item 3: Cancel (SIGTERM, Ctrl-C) saves the step it stopped at; a resume continues exactly
# ==========================================================================================================
@pytest.mark.parametrize("signal_action", ["term", "int"])
def test_cancel_saves_a_checkpoint_and_usable_lora_files_and_resume_is_exact(tiny, tmp_path, inject, reference,
                                                                             signal_action):
    from flatlora_diffusion.train import Cancelled

    out = tmp_path / "run"
    inject(f"{signal_action}@step:2")  # the signal arrives inside step 2, as a user's Cancel would
    with pytest.raises(Cancelled, match="cancelled at step 2"):
        run(tiny, out, checkpointing_steps=1000)  # no regular checkpoint would exist before the end
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "cancelled" and "resume with --resume_from_checkpoint latest" in status["message"]
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "training_state.json").is_file()
    partial = lora_weights(out)  # the LoRA of step 2, in the run folder and in the checkpoint
    assert_same(partial, lora_weights(checkpoint))
    assert (out / f"{out.name}.safetensors").is_file()
    assert [m["step"] for m in metrics(out)] == [1, 2]
    no_leftovers(out)

    inject("term@never:1")  # disarmed
    run(tiny, out, checkpointing_steps=1000, resume_from_checkpoint="latest")
    assert_same(lora_weights(out), reference)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


def test_ctrl_c_in_a_terminal_saves_then_exits_130(tiny, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "flatlora_diffusion.cli", "train",
                             *settings_argv(tiny, out, max_train_steps=400)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert "Traceback" not in err, err[-2000:]
    status = json.loads((out / "status.json").read_text())
    step = status["step"]
    assert status["state"] == "cancelled" and 2 <= step < 400
    assert (out / "checkpoints" / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors").is_file()
    assert_same(lora_weights(out), lora_weights(out / "checkpoints" / f"checkpoint-{step}"))
