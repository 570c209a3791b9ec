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


def colour_pixels(image, colour) -> int:
    import numpy as np

    return int((np.asarray(image.convert("RGB")) == np.array(colour)).all(-1).sum())


CELL = 160 * 160  # a 32 px sample is shown enlarged to 160 px (compare._viewable)


def test_the_grid_starts_with_the_base_model_column_of_step_0(tmp_path):
    from tests.compare_world import BASE_RED, COLOURS

    make_pair(tmp_path / "runs", "ab")
    runs = sorted(list_runs(tmp_path / "runs"), key=lambda r: r.name, reverse=True)  # lora, flat
    grid, used, found = compare.validation_grid(runs, 8)
    assert used == [8, 8]
    # the pair shares one base-model column: 2 rows (seeds) of step-0 images, then each run at step 8
    assert [len(b.runs) for b in found] == [2] and found[0].source is not None
    assert colour_pixels(grid, BASE_RED) == 2 * CELL
    assert colour_pixels(grid, COLOURS[("lora", 8)]) == colour_pixels(grid, COLOURS[("flat", 8)]) == 2 * CELL
    assert compare.baseline_note(found).startswith("Base model: the runs' step-0 images")


def test_runs_on_other_base_settings_get_a_base_column_each_and_a_missing_one_is_said(tmp_path):
    from tests.compare_world import BASE_RED

    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "a", "lora", None)
    make_run(runs_dir, "b", "flat", None, extra_config="validation_guidance_scale: 3.0\n")
    grid, _, found = compare.validation_grid(list_runs(runs_dir), 8)
    assert len(found) == 2 and colour_pixels(grid, BASE_RED) == 4 * CELL
    assert all("as in" in b.label(True) for b in found)
    # a run without step-0 images (started from a checkpoint): a labelled empty column, and the note says so
    make_run(runs_dir, "c", "flat", None, sample_steps=(4, 8))
    only_c = [r for r in list_runs(runs_dir) if r.name == "c"]
    grid_c, _, found = compare.validation_grid(only_c, 8)
    assert found[0].source is None and found[0].label(False) == "base model\nno step-0 images"
    note = compare.baseline_note(found)
    assert note.startswith("No step-0 images for c") and "include the base model" in note
    assert colour_pixels(grid_c, BASE_RED) == 0 and grid_c.width > 2 * 160  # the empty column is drawn


def test_downloads_are_links_named_after_run_and_format_outside_the_run_folders(tmp_path):
    from app import downloads
    from tests.compare_world import files_of

    runs_dir = tmp_path / "runs"
    lora, flat = make_pair(runs_dir, "myrun")
    before = files_of(flat)
    run = {r.name: r for r in list_runs(runs_dir)}["myrun-flat"]
    offered = downloads.final_files(run)
    assert [p.name for p in offered] == ["myrun-flat_kohya.safetensors", "myrun-flat_diffusers.safetensors"]
    assert offered[1].read_bytes() == (flat / "pytorch_lora_weights.safetensors").read_bytes()
    assert files_of(flat) == before and all(not p.is_relative_to(flat) for p in offered)
    assert [r.name for r in list_runs(runs_dir)] == ["myrun-flat", "myrun-lora"]  # .downloads is not a run
    # the link follows the file when the trainer replaces it (a resumed run's new final LoRA)
    (flat / "pytorch_lora_weights.safetensors").write_bytes(b"new")
    assert offered[1].read_bytes() == b"new"
    # a deleted run's links go
    import shutil

    shutil.rmtree(flat)
    downloads.prune(runs_dir)
    assert not (runs_dir / downloads.DOWNLOADS / "myrun-flat").exists()
    assert downloads.download_name("myrun-flat", "diffusers", step=120) == "myrun-flat_step120_diffusers.safetensors"


def test_the_lora_of_a_step_is_its_checkpoints_file_or_the_finished_files_at_their_step(tmp_path):
    from app import downloads

    runs_dir = tmp_path / "runs"
    lora, flat = make_pair(runs_dir, "st")
    run = {r.name: r for r in list_runs(runs_dir)}
    # the finished files' step comes from their metadata (ss_steps), not from a guess
    assert run["st-flat"].final_lora_step() == 8
    assert {s: sorted(f) for s, f in run["st-flat"].lora_steps().items()} == {4: ["diffusers"],
                                                                              8: ["diffusers", "kohya"]}
    files, note = downloads.step_files([run["st-lora"], run["st-flat"]], [4, 4])
    assert [p.name for p in files] == ["st-lora_step4_diffusers.safetensors", "st-flat_step4_diffusers.safetensors"]
    assert files[1].read_bytes() == (flat / "checkpoints/checkpoint-4/pytorch_lora_weights.safetensors").read_bytes()
    assert note == ""
    files, _ = downloads.step_files([run["st-flat"]], [8])
    assert [p.name for p in files] == ["st-flat_step8_kohya.safetensors", "st-flat_step8_diffusers.safetensors"]
    # no file of that step: said per run, with the steps that have one
    (flat / "checkpoints/checkpoint-4/pytorch_lora_weights.safetensors").unlink()
    files, note = downloads.step_files([run["st-lora"], run["st-flat"]], [4, 4])
    assert [p.name for p in files] == ["st-lora_step4_diffusers.safetensors"]
    assert note.startswith("st-flat: no LoRA file of step 4 (LoRA files at steps: 8)  \n")
    assert "Checkpoint every N steps" in note
    files, note = downloads.step_files([run["st-lora"], run["st-flat"]], [0, 0])
    assert files == [] and note.startswith("st-lora, st-flat: step 0 is the base model")


def test_a_cancelled_runs_files_count_at_the_step_it_stopped_and_files_without_metadata_at_its_last_step(tmp_path):
    from tests.compare_world import lora_file

    runs_dir = tmp_path / "runs"
    stopped = make_run(runs_dir, "stopped", "flat", None, state="cancelled", total=8, sample_steps=(0, 4),
                       checkpoints=(4,), final=False)
    lora_file(stopped / "pytorch_lora_weights.safetensors", 5, 1.0)  # cancelled at step 5
    assert {r.name: r for r in list_runs(runs_dir)}["stopped"].lora_steps().keys() == {4, 5}
    other = make_run(runs_dir, "other", "lora", None, final=False)  # files another tool wrote, no metadata
    (other / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert {r.name: r for r in list_runs(runs_dir)}["other"].final_lora_step() == 8


def test_the_settings_table_holds_what_differs_unless_all_are_asked_for(tmp_path):
    from app.compare_table import settings_table

    runs_dir = tmp_path / "runs"
    make_pair(runs_dir, "ab")  # identical but for flat_sigma; output_dir, output_name, images: each its own
    runs = sorted(list_runs(runs_dir), key=lambda r: r.name, reverse=True)
    headers, rows, note = settings_table(runs)
    assert headers == ["setting", "ab-lora", "ab-flat"]
    settings = [r[0] for r in rows if r[0] not in ("state", "step", "first_loss", "final_loss",
                                                  "mean_loss_last_10pct", "it_per_s", "duration_s")]
    assert settings == ["flat_sigma"] and rows[0] == ["flat_sigma", "0.0", "0.1"]
    assert rows[-1][0] == "duration_s"  # then the metrics
    assert note.startswith("Only the 1 of ") and "show all settings" in note
    _, rows, note = settings_table(runs, show_all=True)
    shown = [r[0] for r in rows]
    assert {"seed", "output_dir", "instance_data_dir", "validation_seeds"} <= set(shown)
    assert shown.index("pretrained_model_name_or_path") == 0 and note.startswith("All ")
    # a folder outside the run (typed by the user) is a real difference
    flat = runs_dir / "ab-flat" / "config.yaml"
    flat.write_text(flat.read_text().replace(f"instance_data_dir: {runs_dir / 'ab-flat'}/instance_images",
                                             "instance_data_dir: /data/other-images"))
    _, rows, _ = settings_table(runs)
    assert [r[0] for r in rows][:2] == ["flat_sigma", "instance_data_dir"]
