"""The Train and Runs tabs in a real browser (Debian's Chromium driven by Playwright), for what a newcomer
sees: readable labels, the run plan, caption uploads, a form that survives a reload, a Launch that ignores a
double click, confirmations, run management and a readable loss chart.

The trainer is the stand-in of test_app_launcher.py (it writes the run-directory contract in a fraction of a
second), so these tests cost seconds; test_app_browser.py drives the real trainer."""

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from flatlora_diffusion.tiny import make_subject_images
from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS, _HAVE_CHROMIUM, field
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


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


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
