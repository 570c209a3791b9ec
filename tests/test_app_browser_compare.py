"""The Compare tab in a real browser (Debian's Chromium driven by Playwright) on run folders written by
tests/compare_world.py: the step slider's number box, which pair is preselected, the baseline column, download
names, the LoRA of the shown step and the differences-only settings table.

Each validation image is one solid colour per (run, step), so the tests read from the grid's pixels which run
and step each column shows."""

import io
import socket
import time

import numpy as np
import pytest

from tests.compare_world import BASE_RED, COLOURS, files_of, make_pair
from tests.test_app_browser import CHROMIUM, _HAVE_CHROMIUM, browser  # noqa: F401 (browser is a fixture)

pytestmark = pytest.mark.skipif(not _HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture
def serve(tmp_path, browser):
    """serve(runs_dir) -> a page on the app's Compare tab for that runs folder; page errors fail the test."""
    import app

    opened = []

    def start(runs_dir):
        demo, launcher = app.create_app(runs_dir, refresh_s=0.5)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            ssr_mode=False, allowed_paths=[str(runs_dir)])
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        opened.append((demo, launcher, context, errors))
        start.demo = demo
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_role("tab", name="Compare").click()
        return page

    yield start
    for demo, launcher, context, errors in opened:
        context.close()
        launcher.shutdown(cancel_running=True, timeout=10)
        demo.close()
        assert not errors, errors


def grid_colours(page) -> set[tuple[int, int, int]]:
    """The test colours (see compare_world) present in the shown grid image, read from its own bytes."""
    from PIL import Image

    src = page.locator("#cmp-grid img").get_attribute("src")
    rgb = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")).reshape(-1, 3)
    present = {tuple(int(v) for v in c) for c in np.unique(rgb, axis=0)}
    return present & ({BASE_RED} | set(COLOURS.values()))


def wait_colours(page, expected: set, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = grid_colours(page)
        except Exception:  # the image is being replaced
            seen = None
        if seen == expected:
            return
        time.sleep(0.3)
    raise AssertionError(f"grid colours {seen}, expected {expected}")


def pick_runs(page, names):
    box = page.locator("#cmp-runs input")
    for name in names:
        box.fill(name)
        box.press("Enter")


def test_a_step_typed_into_the_number_box_shows_that_steps_images(tmp_path, serve):
    from playwright.sync_api import expect

    make_pair(tmp_path / "runs", "typed")
    page = serve(tmp_path / "runs")
    expect(page.locator("#cmp-info")).to_contain_text("typed-flat at step 8", timeout=30_000)
    number = page.locator("#cmp-step input[type=number]")
    number.fill("4")
    number.press("Enter")  # no blur: the box keeps the focus, as after typing and Enter
    expect(page.locator("#cmp-info")).to_contain_text("typed-flat at step 4", timeout=10_000)
    assert COLOURS[("lora", 4)] in grid_colours(page) and COLOURS[("flat", 4)] in grid_colours(page)
    assert COLOURS[("lora", 8)] not in grid_colours(page)


def test_the_newest_pair_with_images_is_preselected_and_none_is_said_in_one_line(tmp_path, serve):
    from playwright.sync_api import expect

    now = time.time()
    make_pair(tmp_path / "runs", "done", created_at=now - 100)
    make_pair(tmp_path / "runs", "late", state="cancelled", sample_steps=(), checkpoints=(), final=False,
              created_at=now)
    page = serve(tmp_path / "runs")
    selected = page.locator("#cmp-runs .token")
    expect(selected).to_have_count(2, timeout=30_000)
    assert sorted(selected.all_inner_texts()) == ["done-flat", "done-lora"]
    page.locator("#cmp-grid img").wait_for(timeout=20_000)

    make_pair(tmp_path / "none", "late", state="cancelled", sample_steps=(), checkpoints=(), final=False)
    page = serve(tmp_path / "none")
    expect(page.locator("#cmp-info")).to_have_text(
        "No run has validation images yet (a run makes them at step 0 when it has a validation prompt): pick runs "
        "to compare their settings and files.", timeout=30_000)
    expect(page.locator("#cmp-runs .token")).to_have_count(0)


def test_a_base_model_column_shows_step_0_beside_the_runs(tmp_path, serve):
    from playwright.sync_api import expect

    make_pair(tmp_path / "runs", "base")
    page = serve(tmp_path / "runs")
    info = page.locator("#cmp-info")
    expect(info).to_contain_text("base-flat at step 8", timeout=30_000)
    expect(info).to_contain_text("Base model: the runs' step-0 images")
    wait_colours(page, {BASE_RED, COLOURS[("lora", 8)], COLOURS[("flat", 8)]})

    # runs without step-0 images (started from a checkpoint): the page says why the column is empty
    make_pair(tmp_path / "resumed", "resumed", sample_steps=(4, 8))
    page = serve(tmp_path / "resumed")
    expect(page.locator("#cmp-info")).to_contain_text(
        "No step-0 images for resumed-lora, resumed-flat, so its base-model column is empty", timeout=30_000)
    wait_colours(page, {COLOURS[("lora", 8)], COLOURS[("flat", 8)]})


def download(page, box: str, name: str):
    """Click the download link of `name` in a file box; (the name the browser saves it as, its bytes)."""
    with page.expect_download(timeout=20_000) as info:
        page.locator(f"{box} a[download='{name}']").click()
    return info.value.suggested_filename, open(info.value.path(), "rb").read()


def test_each_final_lora_file_downloads_under_its_run_and_format(tmp_path, serve):
    from playwright.sync_api import expect

    runs_dir = tmp_path / "runs"
    lora, flat = make_pair(runs_dir, "myrun")
    before = {r: files_of(r) for r in (lora, flat)}
    page = serve(runs_dir)
    names = page.locator("#cmp-files td.filename")
    expect(names).to_have_count(4, timeout=30_000)
    assert sorted(names.evaluate_all("tds => tds.map(td => td.getAttribute('aria-label'))")) == [
        "myrun-flat_diffusers.safetensors", "myrun-flat_kohya.safetensors",
        "myrun-lora_diffusers.safetensors", "myrun-lora_kohya.safetensors"]
    for run, fmt, source in ((flat, "diffusers", "pytorch_lora_weights.safetensors"),
                             (lora, "diffusers", "pytorch_lora_weights.safetensors"),
                             (flat, "kohya", "myrun-flat.safetensors")):
        saved_as, data = download(page, "#cmp-files", f"{run.name}_{fmt}.safetensors")
        assert saved_as == f"{run.name}_{fmt}.safetensors" and data == (run / source).read_bytes()
    assert {r: files_of(r) for r in (lora, flat)} == before  # the run folders are as the trainer left them


def test_the_tab_does_not_redraw_itself_while_nothing_changes(tmp_path, serve):
    """Two listeners of the runs picker's change set each other off (Gradio sends the picker's value again
    after each answer): the tab redrew itself every second, busy overlays caught clicks and reset the step."""
    import json

    from playwright.sync_api import expect

    make_pair(tmp_path / "runs", "still")
    page = serve(tmp_path / "runs")
    names = {i: getattr(dep.fn, "__name__", "") for i, dep in enumerate(serve.demo.fns.values())}
    expect(page.locator("#cmp-info")).to_contain_text("still-flat at step 8", timeout=30_000)
    page.wait_for_timeout(3000)  # the page has opened
    calls = []

    def on_request(request):
        if "queue/join" in request.url:
            calls.append(names.get(json.loads(request.post_data or "{}").get("fn_index")))

    page.on("request", on_request)
    page.wait_for_timeout(5000)
    timers = {"watch", "tick", "clear", "follow_evaluations"}  # the live views' own timers
    assert [c for c in calls if c not in timers] == []


def test_the_lora_of_the_shown_step_downloads_per_run_with_the_step_in_its_name(tmp_path, serve):
    from playwright.sync_api import expect

    runs_dir = tmp_path / "runs"
    lora, flat = make_pair(runs_dir, "st")
    before = {r: files_of(r) for r in (lora, flat)}
    page = serve(runs_dir)
    box = page.locator("#cmp-step-files td.filename")
    labels = "tds => tds.map(td => td.getAttribute('aria-label'))"
    # the newest step: the finished files, in both formats
    expect(box).to_have_count(4, timeout=30_000)
    assert sorted(box.evaluate_all(labels)) == [
        "st-flat_step8_diffusers.safetensors", "st-flat_step8_kohya.safetensors",
        "st-lora_step8_diffusers.safetensors", "st-lora_step8_kohya.safetensors"]
    # step 4: each run's checkpoint-4 file
    number = page.locator("#cmp-step input[type=number]")
    number.fill("4")
    number.press("Enter")
    expect(box).to_have_count(2, timeout=10_000)
    assert sorted(box.evaluate_all(labels)) == ["st-flat_step4_diffusers.safetensors",
                                                "st-lora_step4_diffusers.safetensors"]
    saved_as, data = download(page, "#cmp-step-files", "st-flat_step4_diffusers.safetensors")
    assert saved_as == "st-flat_step4_diffusers.safetensors"
    assert data == (flat / "checkpoints" / "checkpoint-4" / "pytorch_lora_weights.safetensors").read_bytes()
    # step 0: no LoRA, and the page says why
    number.fill("0")
    number.press("Enter")
    expect(page.locator("#cmp-step-note")).to_contain_text("step 0 is the base model", timeout=10_000)
    expect(box).to_have_count(0)
    assert {r: files_of(r) for r in (lora, flat)} == before


def test_the_settings_table_shows_what_differs_and_all_on_request(tmp_path, serve):
    from playwright.sync_api import expect

    make_pair(tmp_path / "runs", "tab")
    page = serve(tmp_path / "runs")
    table = page.locator("#cmp-table")
    expect(table).to_contain_text("flat_sigma", timeout=30_000)
    expect(table).to_contain_text("final_loss")
    expect(table).not_to_contain_text("learning_rate")  # the same in both runs
    expect(page.locator("#cmp-table-note")).to_contain_text("Only the 1 of")
    page.locator("#cmp-all-settings input[type=checkbox]").check()
    expect(table).to_contain_text("learning_rate", timeout=10_000)
    expect(page.locator("#cmp-table-note")).to_contain_text("All ")
