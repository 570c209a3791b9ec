"""The Train and Runs tabs in a real browser (Debian's Chromium driven by Playwright), for what a newcomer
sees: readable labels, the run plan, caption uploads, a form that survives a reload, a Launch that ignores a
double click, confirmations, run management and a readable loss chart.

The trainer is the stand-in of test_app_launcher.py (it writes the run-directory contract in a fraction of a
second), so these tests cost seconds; test_app_browser.py drives the real trainer."""

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from flatlora_diffusion.tiny import make_subject_images
from tests.test_app_browser import CHROMIUM, _HAVE_CHROMIUM, browser, field  # noqa: F401 (browser is a fixture)
from tests.test_app_launcher import FAKE_TRAINER

pytestmark = pytest.mark.skipif(not _HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import app

    base = tmp_path_factory.mktemp("browser-train")
    trainer = base / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    images = make_subject_images(base / "images", n=3, size=32, seed=0)
    old = os.environ.get("FAKE_DELAY")
    os.environ["FAKE_DELAY"] = "0.2"  # the stand-in trainer's seconds per step (the children inherit it)
    demo, launcher = app.create_app(base / "runs", trainer_command=[sys.executable, str(trainer)], refresh_s=0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        ssr_mode=False, allowed_paths=[str(base / "runs")])
    yield {"url": f"http://127.0.0.1:{port}/", "runs": base / "runs", "images": images, "launcher": launcher,
           "base": base}
    launcher.shutdown(cancel_running=True, timeout=20)
    demo.close()
    if old is None:
        os.environ.pop("FAKE_DELAY", None)
    else:
        os.environ["FAKE_DELAY"] = old


@pytest.fixture
def page(server, browser):
    """A fresh browser context (empty localStorage) on the Train tab; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server["url"])
    pg.locator("#launch").wait_for(timeout=30_000)
    yield pg
    context.close()
    assert not errors, errors


def block(page, name):
    """The whole block of a form field (label, info, input)."""
    return page.locator(f"#field-{name}")


def test_fields_have_human_labels_with_the_setting_name_in_their_help(page):
    from playwright.sync_api import expect

    def label(name):
        return block(page, name).locator("[data-testid='block-info']").first

    expect(label("learning_rate")).to_have_text("Learning rate")
    # the flag / YAML key is in the help under the label, for matching the CLI and presets
    expect(block(page, "learning_rate").locator(".info-text")).to_contain_text("(--learning_rate)")
    expect(label("pretrained_model_name_or_path")).to_have_text("Base model")
    expect(label("max_train_steps")).to_have_text("Training steps")


def fill_basics(page, server, steps=None):
    field(page, "pretrained_model_name_or_path").fill("org/model")
    field(page, "instance_prompt").fill(PROMPT)
    page.locator("#uploads input[type=file]").set_input_files([str(p) for p in server["images"]])
    if steps is not None:
        field(page, "max_train_steps").fill(str(steps))


def test_the_run_plan_follows_the_form_before_launch(page, server):
    from playwright.sync_api import expect

    plan = page.locator("#run-plan")
    # the defaults train: 500 steps, validation images of the instance prompt a quarter of the run apart
    assert field(page, "max_train_steps").input_value() == "500"
    fill_basics(page, server)
    expect(plan).to_contain_text("3 images / batch 4 → 1 step per epoch, 500 epochs", timeout=10_000)
    expect(plan).to_contain_text("500 training steps")
    expect(plan).to_contain_text("Validation images at steps 0, 125, 250, 375, 500")
    expect(plan).to_contain_text("known after a first run")
    # it follows the form: a short run and no prompt at all are warned about
    field(page, "max_train_steps").fill("20")
    expect(plan).to_contain_text("Only 20 training steps", timeout=10_000)
    field(page, "instance_prompt").fill("")
    expect(plan).to_contain_text("No validation prompt", timeout=10_000)
    # once a run on this machine measured its speed, the plan estimates the time (A/B: two runs)
    earlier = server["runs"] / "measured-earlier"
    earlier.mkdir()
    (earlier / "config.yaml").write_text("pretrained_model_name_or_path: org/model\ntrain_batch_size: 4\n")
    (earlier / "status.json").write_text(json.dumps({"state": "completed", "step": 9, "total": 9}))
    (earlier / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 0.5, "it_per_s": 0.5}) + "\n")
    field(page, "max_train_steps").fill("600")
    page.locator("#ab input[type=checkbox]").check()
    expect(plan).to_contain_text("about 40 min", timeout=10_000)  # 2 runs x 600 steps x 2 s
    expect(plan).to_contain_text("measured-earlier")


def launched(server, prefix):
    return sorted(p.name for p in server["runs"].iterdir() if p.name.startswith(prefix))


def test_caption_files_upload_with_the_images(page, server):
    from playwright.sync_api import expect

    up = server["base"] / "captioned"
    up.mkdir()
    files = []
    for i, img in enumerate(server["images"][:2]):
        (up / f"toy{i}.png").write_bytes(img.read_bytes())
        (up / f"toy{i}.txt").write_text(f"a photo of sks toy, view {i}\n")
        files += [str(up / f"toy{i}.png"), str(up / f"toy{i}.txt")]
    field(page, "pretrained_model_name_or_path").fill("org/model")
    field(page, "max_train_steps").fill("3")
    page.locator("#uploads input[type=file]").set_input_files(files)
    uploads = page.locator("#uploads")
    expect(uploads).to_contain_text(re.compile(r"toy1\s*\.txt\s*[\d.]+\s*B"), timeout=10_000)  # listed like the images
    expect(uploads).not_to_contain_text("Error")
    expect(page.locator("#run-plan")).to_contain_text("2 images", timeout=10_000)
    expect(page.locator("#run-plan")).not_to_contain_text("No instance prompt")  # the captions say it all
    page.locator("#run-name").locator("input, textarea").first.fill("captioned")
    page.locator("#launch").click()
    expect(page.locator("#launch-msg")).to_contain_text("captioned", timeout=20_000)
    folder = server["runs"] / "captioned" / "instance_images"
    assert (folder / "image_001.txt").read_text().strip() == "a photo of sks toy, view 1"
    assert sorted(p.name for p in folder.iterdir()) == ["image_000.png", "image_000.txt", "image_001.png",
                                                       "image_001.txt"]


def fake_run(runs_dir, name, state="completed", sigma=0.1, group=None, variant=None, losses=()):
    """A run folder as the trainer leaves it (config, status, metrics), for what the page reads."""
    run = runs_dir / name
    run.mkdir()
    (run / "config.yaml").write_text(f"pretrained_model_name_or_path: org/model\nflat_sigma: {sigma}\n"
                                     f"output_dir: {run}\n")
    (run / "status.json").write_text(json.dumps({"state": state, "step": len(losses), "total": len(losses),
                                                 "message": state}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                               for i, v in enumerate(losses)))
    meta = {"created_at": time.time()}
    if group:
        meta.update(ab_group=group, ab_variant=variant)
    (run / "app.json").write_text(json.dumps(meta))
    return run


def test_the_loss_chart_is_readable_and_shows_both_curves_of_an_ab_pair(page, server):
    from playwright.sync_api import expect

    losses = [1.0 / (1 + 0.1 * i) for i in range(40)]  # identical curves: same seeds, tiny sigma
    fake_run(server["runs"], "chart-lora", sigma=0.0, group="chart", variant="lora", losses=losses)
    fake_run(server["runs"], "chart-flat", sigma=0.1, group="chart", variant="flat", losses=losses)
    follow = page.locator("#follow input")
    follow.fill("chart-flat")
    follow.press("Enter")
    curves = page.locator("#loss-plot polyline.run")
    expect(curves).to_have_count(2, timeout=20_000)
    styles = [curves.nth(i).evaluate("e => [e.getAttribute('stroke'), e.getAttribute('stroke-dasharray')]")
              for i in range(2)]
    assert styles[0][0] != styles[1][0] and styles[0][1] is None and styles[1][1]  # colours differ; one dashed
    keys = page.locator("#loss-plot line.key")
    assert keys.nth(1).get_attribute("stroke-dasharray") == styles[1][1]  # the legend shows the dash too
    expect(page.locator("#loss-plot")).to_contain_text("chart-lora (LoRA)")
    expect(page.locator("#loss-plot")).to_contain_text("chart-flat (Flat-LoRA")
    # every text of the chart is at least 11 px on screen (font size x the drawing's scale)
    sizes = page.locator("#loss-plot svg text").evaluate_all(
        "els => els.map(e => parseFloat(getComputedStyle(e).fontSize) * e.ownerSVGElement.getScreenCTM().a)")
    assert sizes and min(sizes) >= 11, sizes
    # both curves can be seen: the lower (solid) one shows through the dashes of the upper one
    import io

    import numpy as np
    from PIL import Image

    time.sleep(0.5)
    rgb = np.asarray(Image.open(io.BytesIO(page.locator("#loss-plot").screenshot())).convert("RGB")).astype(int)

    def pixels(hex_colour):
        target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(rgb - target).sum(-1) < 60).sum())

    assert pixels(styles[0][0]) > 150 and pixels(styles[1][0]) > 150


def state_of(server, name):
    try:
        return json.loads((server["runs"] / name / "status.json").read_text()).get("state")
    except (OSError, ValueError):
        return None


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_the_form_survives_a_reload(page, server):
    from playwright.sync_api import expect

    field(page, "instance_prompt").fill("a photo of zwx cat")
    field(page, "learning_rate").fill("2e-4")
    field(page, "max_train_steps").fill("321")
    page.locator("#ab input[type=checkbox]").check()
    time.sleep(1.5)  # the browser stores the form as it changes
    page.reload()
    page.locator("#launch").wait_for(timeout=30_000)
    expect(field(page, "instance_prompt")).to_have_value("a photo of zwx cat", timeout=10_000)
    expect(field(page, "learning_rate")).to_have_value("2e-4")
    expect(field(page, "max_train_steps")).to_have_value("321")
    expect(page.locator("#ab input[type=checkbox]")).to_be_checked()
    expect(page.locator("#run-plan")).to_contain_text("321 training steps")
    # and a new browser (another person) starts from the defaults
    other = page.context.browser.new_page()
    other.goto(server["url"])
    other.locator("#launch").wait_for(timeout=30_000)
    time.sleep(1.0)
    assert field(other, "max_train_steps").input_value() == "500"
    other.close()


def test_a_double_click_on_launch_queues_one_launch(page, server):
    fill_basics(page, server, steps=3)
    page.locator("#ab input[type=checkbox]").check()
    page.locator("#run-name").locator("input, textarea").first.fill("twice")
    page.locator("#launch").dblclick()
    page.locator("#launch-msg").get_by_text("twice-lora").wait_for(timeout=20_000)
    time.sleep(2.0)  # a second launch would have written its folders by now
    assert launched(server, "twice") == ["twice-flat", "twice-lora"]


def test_cancel_asks_before_it_stops_a_run(page, server):
    from playwright.sync_api import expect

    fill_basics(page, server, steps=200)  # 40 s with the stand-in trainer
    page.locator("#run-name").locator("input, textarea").first.fill("asked")
    page.locator("#launch").click()
    page.locator("#launch-msg").get_by_text("asked").wait_for(timeout=20_000)
    wait_until(lambda: state_of(server, "asked") == "running", timeout=30)
    follow = page.locator("#follow input")  # picked by hand: a timer tick may have followed another run
    follow.fill("asked")
    follow.press("Enter")
    expect(follow).to_have_value("asked", timeout=10_000)
    questions = []

    def answer(accept):
        def on_dialog(dialog):
            questions.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()
        return on_dialog

    page.once("dialog", answer(False))
    page.locator("#cancel").click()
    wait_until(lambda: questions, timeout=10)
    assert "asked" in questions[0]
    time.sleep(1.5)
    assert state_of(server, "asked") == "running"  # "no" keeps it training
    page.once("dialog", answer(True))
    page.locator("#cancel").click()
    wait_until(lambda: state_of(server, "asked") == "cancelled", timeout=30)
    expect(page.locator("#launch-msg")).to_contain_text("asked", timeout=10_000)


def test_runs_tab_deletes_renames_sizes_and_refreshes_itself(page, server):
    from playwright.sync_api import expect

    runs_dir = server["runs"]
    fake_run(runs_dir, "tidy-a", losses=[0.5, 0.4])
    fake_run(runs_dir, "tidy-two", losses=[0.5])
    fake_run(runs_dir, "tidy-busy", state="running", losses=[0.5])
    page.get_by_role("tab", name="Runs").click()
    table = page.locator("#runs-table")
    expect(table).to_contain_text("tidy-a", timeout=20_000)
    expect(table).to_contain_text("size on disk")
    expect(table).to_contain_text(re.compile(r"\d+ B"))  # a run's size, e.g. "310 B"
    # the table follows the runs folder without a click on Refresh
    fake_run(runs_dir, "tidy-late")
    expect(table).to_contain_text("tidy-late", timeout=15_000)

    def pick(name):
        box = page.locator("#run-pick input")
        box.fill(name)
        box.press("Enter")
        expect(box).to_have_value(name, timeout=10_000)

    questions = []

    def answer(accept):
        def on_dialog(dialog):
            questions.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()
        return on_dialog

    message = page.locator("#run-msg")
    pick("tidy-a")
    page.once("dialog", answer(False))
    page.locator("#delete-run").click()
    expect(message).to_contain_text("Not deleted", timeout=10_000)
    assert "tidy-a" in questions[-1] and (runs_dir / "tidy-a").is_dir()
    page.once("dialog", answer(True))
    page.locator("#delete-run").click()
    expect(message).to_contain_text("Deleted tidy-a", timeout=10_000)
    assert not (runs_dir / "tidy-a").exists()
    expect(table).not_to_contain_text("tidy-a", timeout=10_000)
    # a message does not stay to describe an old state: it is cleared a few seconds later
    expect(message).to_have_text("", timeout=15_000)

    pick("tidy-two")
    page.locator("#rename-to").locator("input, textarea").first.fill("tidy-renamed")
    page.once("dialog", answer(True))
    page.locator("#rename-run").click()
    expect(message).to_contain_text("Renamed tidy-two to tidy-renamed", timeout=10_000)
    assert (runs_dir / "tidy-renamed" / "config.yaml").is_file() and not (runs_dir / "tidy-two").exists()
    assert str(runs_dir / "tidy-renamed") in (runs_dir / "tidy-renamed" / "config.yaml").read_text()
    expect(table).to_contain_text("tidy-renamed", timeout=10_000)

    # never while it trains: refused with a reason, the folder untouched
    pick("tidy-busy")
    page.once("dialog", answer(True))
    page.locator("#delete-run").click()
    expect(message).to_contain_text("tidy-busy is running: cancel it first", timeout=10_000)
    assert (runs_dir / "tidy-busy").is_dir()
