"""The web app end to end through gradio_client, with the real `flatlora-diffusion train` on a tiny model:
launch an A/B run with uploaded images, follow it to the end, compare, generate now, download both files;
cancel a real training; refuse bad input; auth; `python -m app`."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flatlora_diffusion.tiny import make_subject_images, make_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks toy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("app-tiny")
    return {"model": make_tiny_pipeline(base / "sd15", "sd15", seed=0),
            "images": make_subject_images(base / "images", n=3, size=64, seed=0)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free local port, with the real trainer; the client; the runs folder."""
    import app
    from gradio_client import Client

    runs_dir = tmp_path_factory.mktemp("app") / "runs"
    old_tmp = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(runs_dir / ".gradio")  # as `app.main` does: uploads stay inside
    demo, launcher = app.create_app(runs_dir, refresh_s=0.5)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        ssr_mode=False, allowed_paths=[str(runs_dir)])
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(runs_dir.parent / "downloads"))
    yield client, runs_dir, launcher
    launcher.shutdown(cancel_running=True, timeout=20)
    demo.close()
    if old_tmp is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = old_tmp


def form(tiny, **over):
    values = dict(
        pretrained_model_name_or_path=str(tiny["model"]), instance_prompt=PROMPT, resolution="64",
        max_train_steps="6", learning_rate="1e-3", train_batch_size=1, lr_warmup_steps=0, checkpointing_steps=1000,
        validation_prompt=f"{PROMPT}\na sks toy on the beach", validation_seeds="0, 1", validation_steps="3",
        validation_inference_steps=2, flat_sigma=0.1, flat_schedule="constant", seed="7",
    )
    values.update(over)
    return values


def follow(client, run, until=("completed", "failed", "cancelled"), timeout=120, every=0.3):
    """Poll the status endpoint until every run of the group is in `until`; return the states seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.predict(run=run, api_name="/status")
        seen.append({name: (r["state"], r["step"], r["total"]) for name, r in st["runs"].items()})
        seen[-1]["_queue"] = st["queue"]
        if all(r["state"] in until for r in st["runs"].values()):
            return st, seen
        time.sleep(every)
    raise AssertionError(f"timed out; last status: {seen[-1] if seen else None}")


def test_ab_run_end_to_end(server, tiny):
    from gradio_client import handle_file
    from PIL import Image

    client, runs_dir, launcher = server
    t0 = time.monotonic()
    message, follow_value = client.predict(
        ab_on=True, name="e2e", images=[handle_file(str(p)) for p in tiny["images"]],
        **form(tiny, checkpointing_steps=3), api_name="/launch")
    assert "e2e-lora" in message and "e2e-flat" in message
    assert (follow_value.get("value") if isinstance(follow_value, dict) else follow_value) == "e2e-lora"

    status, seen = follow(client, "e2e-lora")
    train_s = time.monotonic() - t0
    runs = status["runs"]
    assert list(runs) == ["e2e-lora", "e2e-flat"]
    for name, r in runs.items():
        assert r["state"] == "completed", (name, r["message"], r["log_tail"])
        assert r["step"] == r["total"] == 6 and r["metrics"] == 6 and r["sample_steps"] == [0, 3, 6]
    # one at a time: while LoRA trained, Flat-LoRA waited in the visible queue; progress was seen moving
    assert any(s["e2e-lora"][0] == "running" and s["e2e-flat"][0] == "queued" and s["_queue"]["queued"] == ["e2e-flat"]
               for s in seen)
    assert any(s["e2e-flat"][0] == "running" for s in seen)
    # identical seeds: the two runs differ only in sigma
    import yaml

    cfgs = [yaml.safe_load((runs_dir / n / "config.yaml").read_text()) for n in runs]
    assert cfgs[0]["seed"] == cfgs[1]["seed"] == 7
    assert (cfgs[0]["flat_sigma"], cfgs[1]["flat_sigma"]) == (0.0, 0.1)
    sigmas = [[json.loads(line)["flat_sigma"] for line in (runs_dir / n / "metrics.jsonl").read_text().splitlines()]
              for n in runs]
    assert set(sigmas[0]) == {0.0} and all(s > 0 for s in sigmas[1])
    # uploads: decoded and stored in the run folder under safe names
    assert sorted(p.name for p in (runs_dir / "e2e-lora" / "instance_images").iterdir()) == \
        ["image_000.png", "image_001.png", "image_002.png"]
    assert launcher.wait_idle(10)
    assert "[app] trainer exited with code 0" in (runs_dir / "e2e-flat" / "train.log").read_text()

    # compare: one column per run, one row per prompt and seed (2 x 2), at the last step and at step 0
    grid, info, loss, table, files, step_files, _, table_note = client.predict(runs=["e2e-lora", "e2e-flat"], step=6,
                                                                               api_name="/compare")
    assert "0, 3, 6" in info
    grid_img = Image.open(grid)
    assert grid_img.height > 4 * 160 and grid_img.width > 2 * 160
    base, *_, step0_files, step0_note, _ = client.predict(runs=["e2e-lora", "e2e-flat"], step=0,
                                                          api_name="/compare")
    assert Image.open(base).size == grid_img.size
    assert not step0_files and "step 0 is the base model" in step0_note
    # the LoRA of the shown step: the finished files at the last step (their metadata says 6), checkpoint-3's
    # file at step 3, each under a name with its run, step and format
    assert sorted(Path(f).name for f in step_files) == [
        "e2e-flat_step6_diffusers.safetensors", "e2e-flat_step6_kohya.safetensors",
        "e2e-lora_step6_diffusers.safetensors", "e2e-lora_step6_kohya.safetensors"]
    *_, step3_files, _, _ = client.predict(runs=["e2e-lora", "e2e-flat"], step=3, api_name="/compare")
    assert sorted(Path(f).name for f in step3_files) == ["e2e-flat_step3_diffusers.safetensors",
                                                         "e2e-lora_step3_diffusers.safetensors"]
    flat3 = next(f for f in step3_files if "flat" in Path(f).name)
    assert Path(flat3).read_bytes() == \
        (runs_dir / "e2e-flat" / "checkpoints" / "checkpoint-3" / "pytorch_lora_weights.safetensors").read_bytes()
    # the settings in which the A/B pair differs (sigma, not the seeds they share), then the metrics; all on request
    assert "flat_sigma" in {row[0] for row in table["data"]} and "seed" not in {row[0] for row in table["data"]}
    assert "final_loss" in {row[0] for row in table["data"]} and "settings that differ" in table_note
    all_table = client.predict(runs=["e2e-lora", "e2e-flat"], step=6, show_all=True, api_name="/compare")[3]
    assert {"flat_sigma", "seed", "final_loss"} <= {row[0] for row in all_table["data"]}
    assert {Path(f).name for f in files} == {"e2e-lora_kohya.safetensors", "e2e-lora_diffusers.safetensors",
                                              "e2e-flat_kohya.safetensors", "e2e-flat_diffusers.safetensors"}
    assert "data-lines='2'" in loss and loss.count("<polyline class='run'") == 2
    assert "e2e-lora (LoRA)" in loss and "e2e-flat (Flat-LoRA sigma=0.1)" in loss

    # generate now: base model + both LoRAs, side by side
    t1 = time.monotonic()
    image = client.predict(runs=["e2e-lora", "e2e-flat"], prompt=PROMPT, negative_prompt="", seed=3, strength=1.0,
                           steps=2, guidance_scale=5.0, include_base=True, api_name="/generate")
    gen_s = time.monotonic() - t1
    gen = Image.open(image)
    assert gen.width > 3 * 160 and gen.height >= 160

    # downloads: both files of a run, loadable, in their formats
    kohya, diffusers = client.predict(run="e2e-flat", api_name="/files")
    assert Path(kohya).name == "e2e-flat.safetensors" and Path(diffusers).name == "pytorch_lora_weights.safetensors"
    k, d = load_file(kohya), load_file(diffusers)
    assert k and all(key.startswith("lora_unet_") for key in k)
    assert d and all(key.startswith("unet.") for key in d)
    assert Path(kohya).read_bytes() == (runs_dir / "e2e-flat" / "e2e-flat.safetensors").read_bytes()

    # the runs survive the app: a new app on the same folder sees them, finished, and starts nothing
    import app

    _, launcher2 = app.create_app(runs_dir, start=True)
    try:
        assert launcher2.snapshot() == {"running": None, "queued": []}
        states = {r["run"]: r["state"] for r in client.predict(api_name="/runs")}
        assert states == {"e2e-lora": "completed", "e2e-flat": "completed"}
    finally:
        launcher2.shutdown()
    print(f"\nA/B training through the app: {train_s:.1f} s; generate now: {gen_s:.1f} s")


def test_cancel_a_real_training(server, tiny):
    client, runs_dir, launcher = server
    message, _ = client.predict(ab_on=False, name="long", images=[],
                                **form(tiny, max_train_steps="5000", validation_prompt="",
                                       instance_data_dir=str(tiny["images"][0].parent)),
                                api_name="/launch")
    assert "long" in message
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = client.predict(run="long", api_name="/status")["runs"]["long"]
        if st["state"] == "running" and st["step"] >= 2:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"never got going: {st}")
    pid = st["pid"]
    assert "long" in client.predict(name="long", api_name="/cancel")
    final, _ = follow(client, "long", timeout=30)
    assert final["runs"]["long"]["state"] == "cancelled"
    assert final["runs"]["long"]["step"] < 5000
    from app.runs import pid_alive

    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)
    assert launcher.wait_idle(10)


def test_bad_input_is_refused_with_one_line_and_writes_nothing(server, tiny, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, runs_dir, _ = server
    before = sorted(p.name for p in runs_dir.iterdir() if not p.name.startswith("."))
    fake = tmp_path / "holiday.png"
    fake.write_text("<?php system($_GET['c']); ?>")
    cases = [
        (dict(images=[handle_file(str(fake))]), "holiday.png: not a readable image"),
        (dict(images=[], instance_data_dir="/definitely/not/here"), "does not exist"),
        (dict(images=[], instance_data_dir=str(tiny["images"][0].parent), resolution="65"), "multiple of 8"),
    ]
    for over, expected in cases:
        kwargs = {**form(tiny), **over}
        with pytest.raises(AppError, match=expected):
            client.predict(ab_on=False, name="bad", api_name="/launch", **kwargs)
    assert sorted(p.name for p in runs_dir.iterdir() if not p.name.startswith(".")) == before


def test_presets_save_and_load_through_the_api(server, tiny):
    client, runs_dir, _ = server
    msg, _choices, path = client.predict(pname="tiny sd15", **form(tiny, rank=8), api_name="/save_preset")
    assert "tiny-sd15" in msg
    saved = runs_dir / ".presets" / "tiny-sd15.yaml"
    import yaml

    data = yaml.safe_load(saved.read_text())
    assert data["rank"] == 8 and data["pretrained_model_name_or_path"] == str(tiny["model"])
    assert "output_dir" not in data
    out = client.predict(pname="tiny-sd15", api_name="/load_preset")
    assert "Loaded" in out[0]
    assert 8 in out[1:]  # the rank widget


def test_auth_is_required_when_set(tmp_path):
    import app
    from gradio_client import Client

    demo, launcher = app.create_app(tmp_path / "runs", start=False)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        ssr_mode=False, auth=("ann", "s3cret"))
    try:
        with pytest.raises(Exception):
            Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/runs")
        assert Client(f"http://127.0.0.1:{port}/", auth=("ann", "s3cret"), verbose=False).predict(api_name="/runs") == []
    finally:
        demo.close()
    args = app.parse_args([])
    assert (args.host, args.port, args.runs_dir, args.auth) == ("127.0.0.1", 7860, "runs", None)
    assert app.parse_args(["--auth", "a:b:c"]).auth == ("a", "b:c")
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "nopassword"])


def test_python_m_app_serves_on_localhost(tmp_path):
    port = free_port()
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "app", "--runs-dir", str(runs_dir), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.communicate()[0][-3000:]) from None
                time.sleep(0.3)
        assert runs_dir.is_dir() and (runs_dir / ".gradio").exists()  # Gradio's cache kept inside the runs folder
        # bound to the loopback interface only
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for addr in addrs:
            with pytest.raises(OSError), socket.create_connection((addr, port), timeout=1):
                pass
    finally:
        proc.terminate()
        proc.wait(20)
