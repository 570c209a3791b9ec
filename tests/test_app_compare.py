"""The Compare tab's logic without a browser (app/compare.py and its helpers), on run folders written by
tests/compare_world.py; tests/test_app_browser_compare.py checks the same points on the page."""

import time

from app import compare
from app.runs import list_runs
from tests.compare_world import make_pair, make_run


def test_the_newest_pair_with_images_is_preselected_not_a_newer_one_without(tmp_path):
    runs_dir = tmp_path / "runs"
    now = time.time()
    make_pair(runs_dir, "old", created_at=now - 300)
    make_pair(runs_dir, "done", created_at=now - 200)
    # newer: a pair cancelled before its first images, and one where only the LoRA run got any
    make_pair(runs_dir, "late", state="cancelled", sample_steps=(), checkpoints=(), final=False, created_at=now - 100)
    make_run(runs_dir, "half-lora", "lora", "half", state="cancelled", created_at=now - 50)
    make_run(runs_dir, "half-flat", "flat", "half", state="cancelled", sample_steps=(), final=False,
             created_at=now - 49)
    assert compare.default_selection(list_runs(runs_dir)) == (["done-lora", "done-flat"], "")


def test_without_a_pair_the_two_newest_runs_with_images_are_preselected(tmp_path):
    runs_dir = tmp_path / "runs"
    now = time.time()
    for i, name in enumerate(["a", "b", "c"]):
        make_run(runs_dir, name, "lora", None, created_at=now + i)
    make_run(runs_dir, "empty", "lora", None, state="failed", sample_steps=(), final=False, created_at=now + 9)
    assert compare.default_selection(list_runs(runs_dir)) == (["c", "b"], "")


def test_when_no_run_has_images_nothing_is_preselected_and_one_line_says_why(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    assert compare.default_selection(list_runs(runs_dir)) == ([], "No run yet: launch one in the Train tab.")
    make_pair(runs_dir, "late", state="cancelled", sample_steps=(), checkpoints=(), final=False)
    names, note = compare.default_selection(list_runs(runs_dir))
    assert names == [] and note.startswith("No run has validation images yet") and "\n" not in note
