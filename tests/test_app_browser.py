"""The web page in a real browser (Debian's Chromium driven by Playwright), with the real trainer on a tiny
model: open each tab, start an A/B run with a click, see progress, loss and images appear, compare, generate,
evaluate both runs with a click and see their evaluation table and sharpness curves.
Screenshots are kept under test-artifacts/app/ (git-ignored) for a person to look at."""

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from flatlora_diffusion.tiny import make_subject_images, make_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "app"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

_HAVE_CHROMIUM = Path(CHROMIUM).exists() and shutil.which(CHROMIUM) is not None
if not _HAVE_CHROMIUM and os.environ.get("FLATLORA_REQUIRE_BROWSER") == "1":  # CI installs it: never skip there
    raise RuntimeError(f"FLATLORA_REQUIRE_BROWSER=1 but there is no Chromium at {CHROMIUM}")
pytestmark = pytest.mark.skipif(not _HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    import app

    base = tmp_path_factory.mktemp("browser")
    model = make_tiny_pipeline(base / "sd15", "sd15", seed=0)
    images = make_subject_images(base / "images", n=3, size=64, seed=0)[0].parent
    demo, launcher = app.create_app(base / "runs", refresh_s=0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        ssr_mode=False, allowed_paths=[str(base / "runs")])
    yield f"http://127.0.0.1:{port}/", model, images, base / "runs"
    launcher.shutdown(cancel_running=True, timeout=20)
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def field(page, name):
    return page.locator(f"#field-{name}").locator("input, textarea").first


def coloured_pixels(locator) -> int:
    """Strongly coloured pixels in an element's picture: plot lines, not the grey grid and text."""
    import io

    import numpy as np
    from PIL import Image

    time.sleep(1.0)
    rgb = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 80).sum())


def shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    time.sleep(1.0)  # let plots finish their transition
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_train_follow_compare_in_the_browser(page_url, browser):
    from playwright.sync_api import expect

    url, model, images, runs_dir = page_url
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.locator("#launch").wait_for(timeout=30_000)
    shot(page, "1-train-tab")

    # fill in the prominent fields and start an A/B run with a click
    field(page, "pretrained_model_name_or_path").fill(str(model))
    field(page, "instance_data_dir").fill(str(images))
    field(page, "instance_prompt").fill("a photo of sks toy")
    field(page, "resolution").fill("64")
    field(page, "max_train_steps").fill("16")
    field(page, "learning_rate").fill("1e-3")
    field(page, "train_batch_size").fill("1")
    field(page, "flat_schedule").click()
    page.get_by_role("option", name="constant", exact=True).click()
    field(page, "validation_prompt").fill("a photo of sks toy")
    field(page, "validation_seeds").fill("0, 1")
    field(page, "validation_steps").fill("8")
    field(page, "seed").fill("3")
    page.get_by_text("More settings: Validation images").click()  # a setting from an accordion
    field(page, "validation_inference_steps").fill("4")
    page.locator("#run-name").locator("input, textarea").first.fill("browser")
    page.locator("#ab input[type=checkbox]").check()
    page.locator("#launch").click()

    page.locator("#launch-msg").get_by_text("browser-lora").wait_for(timeout=30_000)
    # progress appears: the LoRA run trains while the Flat-LoRA run waits in the queue
    page.locator("#progress [data-run='browser-lora'][data-state='running']").wait_for(timeout=60_000)
    page.locator("#queue").get_by_text("browser-flat").wait_for(timeout=10_000)
    try:  # best effort: a picture with the bar part-way and a first piece of loss curve
        page.wait_for_function("(() => { const p = document.querySelector(\"[data-run='browser-lora'] progress\");"
                               " return p && p.value >= 3; })()", timeout=30_000)
    except Exception:
        pass
    shot(page, "2-train-running")
    page.locator("#progress [data-run='browser-flat'][data-state='completed']").wait_for(timeout=120_000)
    page.locator("#progress [data-run='browser-lora'][data-state='completed']").wait_for(timeout=5_000)
    progress = page.locator("#progress progress").first
    assert progress.get_attribute("value") == progress.get_attribute("max") == "16"
    # the newest validation images of both runs (2 seeds each) and the loss curves
    page.wait_for_function("document.querySelectorAll('#newest-images img').length >= 4", timeout=20_000)
    expect(page.locator("#loss-plot polyline.run")).to_have_count(2, timeout=20_000)
    assert coloured_pixels(page.locator("#loss-plot")) > 300  # the curves are drawn, not just the axes
    expect(page.locator("#log textarea")).to_have_value(re.compile("done: .*browser-flat"), timeout=10_000)
    shot(page, "3-train-done")

    # Runs tab: both runs listed; pick one; its two downloads are offered
    page.get_by_role("tab", name="Runs").click()
    expect(page.locator("#runs-table")).to_contain_text("browser-flat", timeout=20_000)
    page.locator("#run-pick input").fill("browser-flat")
    page.locator("#run-pick input").press("Enter")
    page.locator("#dl-kohya").wait_for(timeout=20_000)
    page.locator("#dl-diffusers").wait_for(timeout=5_000)
    assert "browser-flat.safetensors" in page.locator("#dl-kohya").inner_text()
    with page.expect_download(timeout=20_000) as download:
        page.locator("#dl-kohya").click()
    assert download.value.suggested_filename == "browser-flat.safetensors"
    # the diffusers file (pytorch_lora_weights.safetensors in every run folder) downloads under the run's name
    assert "browser-flat_diffusers.safetensors" in page.locator("#dl-diffusers").inner_text()
    with page.expect_download(timeout=20_000) as download:
        page.locator("#dl-diffusers").click()
    assert download.value.suggested_filename == "browser-flat_diffusers.safetensors"
    shot(page, "4-runs-tab")

    # Compare tab: the A/B pair is preselected and its grid appears; then generate now
    page.get_by_role("tab", name="Compare").click()
    page.locator("#cmp-grid img").wait_for(timeout=30_000)
    expect(page.locator("#cmp-loss polyline.run")).to_have_count(2, timeout=10_000)
    # the trainer's step-0 images make the base-model column; the files download under their run's name
    expect(page.locator("#cmp-info")).to_contain_text("Base model: the runs' step-0 images", timeout=10_000)
    expect(page.locator("#cmp-files td.filename")).to_have_count(4, timeout=10_000)
    with page.expect_download(timeout=20_000) as download:
        page.locator("#cmp-files a[download='browser-flat_diffusers.safetensors']").click()
    assert download.value.suggested_filename == "browser-flat_diffusers.safetensors"
    # the LoRA of the shown step: the finished files at step 16; at step 8 (no checkpoint) the page says so
    expect(page.locator("#cmp-step-files td.filename")).to_have_count(4, timeout=10_000)
    number = page.locator("#cmp-step input[type=number]")
    number.fill("8")
    number.press("Enter")
    expect(page.locator("#cmp-step-note")).to_contain_text("browser-flat: no LoRA file of step 8 (LoRA files at "
                                                           "steps: 16)", timeout=10_000)
    shot(page, "5-compare-tab")
    page.locator("#gen-prompt").locator("input, textarea").first.fill("a sks toy on the beach")
    page.locator("#gen-btn").click()
    page.locator("#gen-image img").wait_for(timeout=60_000)
    time.sleep(0.5)
    shot(page, "6-generate-now")

    # evaluation: the table says "not evaluated"; one click queues the real `flatlora-diffusion evaluate` for
    # both runs; the table then shows their scores and the sharpness curves appear
    expect(page.locator("#cmp-eval")).to_contain_text("not evaluated", timeout=10_000)
    expect(page.locator("#cmp-sharp polyline.run")).to_have_count(0)
    page.locator("#cmp-eval-btn").click()
    # the click's answer, or (the page follows evaluations every second) the queue's own words for it
    expect(page.locator("#cmp-eval-msg")).to_contain_text(
        re.compile("evaluation queued|evaluating now|evaluation waiting in the queue"), timeout=10_000)
    expect(page.locator("#cmp-sharp polyline.run")).to_have_count(2, timeout=180_000)
    table = page.locator("#cmp-eval")
    expect(table).to_contain_text("evaluated (instance split)", timeout=10_000)
    expect(table).not_to_contain_text("not evaluated")
    assert "Δ@ρ=0.1" in table.inner_text()
    for name in ("browser-lora", "browser-flat"):
        record = json.loads((runs_dir / name / "eval.json").read_text())
        assert f"{record['loss']['instance']:.4f}" in table.inner_text()  # the numbers of eval.json, shown
    assert coloured_pixels(page.locator("#cmp-sharp")) > 100
    shot(page, "7-compare-evaluation")
    assert not errors, errors
    page.close()
