"""The main job, as the README's first command runs it: the toy-world demo with its default settings.

It must show the product working: after 100 steps the judge finds the subject in most of the subject prompts'
pictures of both runs (and in none of the base model's), in the scenes asked for, including scenes the subject
was never shown in. The shipped world gives 6 and 8 of 8 for LoRA and Flat-LoRA (the judge misses LoRA's subject
at night, drawn brighter and blurred), scenes 6 and 7 of 8 (seed 0's snow comes out pale, and LoRA's beach of seed 0 as
grass: README, "The toy world"), none for the base model; the bounds leave a picture or more of room below that.
Slow for a unit test (about a minute), and the one that matters most.
"""

import json


def test_the_demo_teaches_the_subject_and_places_it_in_new_scenes(tmp_path, capsys):
    from flatlora_diffusion.demo import main

    out = tmp_path / "demo"
    assert main(["--output", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    base, lora, flat = (scores[k] for k in ("base model (step 0)", "LoRA (step 100)", "Flat-LoRA sigma=0.1 (step 100)"))

    def rate(pair):
        found, total = pair
        return found / total

    assert base["subject"][1] == 8 and rate(base["subject"]) <= 0.125
    for run in (lora, flat):
        assert rate(run["subject"]) >= 5 / 8, scores
        assert rate(run["scene"]) >= 5 / 8, scores
        assert rate(run["class_is_subject"]) == 0, scores
    printed = capsys.readouterr().out
    assert "subject" in printed and "class->subject" in printed and "LoRA (step 100)" in printed
    assert (out / "comparison.png").is_file()
    # a second demo into the same folder replaces the first instead of refusing it
    assert main(["--output", str(out), "--steps", "2"]) == 0


def test_side_by_side_demo_files_the_pictures_the_trainer_draws_at_step_zero(tmp_path, monkeypatch):
    """On two cores (OMP_NUM_THREADS unset) the two runs train in processes of their own and a third draws the base
    model's pictures (demo_workers.draw_base_model_pictures), filed as the first run's step 0. They must be the
    pixels the trainer draws itself at step 0, as it does when the runs go one after the other (OMP_NUM_THREADS
    set). The tiny random model: what is compared is the drawing, not what it shows."""
    import os

    import numpy as np
    from PIL import Image

    from flatlora_diffusion import demo

    out = tmp_path / "demo"
    args = ["--output", str(out), "--base", "tiny", "--steps", "2"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # two cores, even on one
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert demo.main(args) == 0
    step_zero = out / "lora" / "samples" / "step_000000"
    side_by_side = {f.name: np.asarray(Image.open(f)) for f in sorted(step_zero.glob("*.png"))}
    assert (step_zero / ".complete").exists() and len(side_by_side) == 4  # 2 prompts x 2 seeds
    assert not (out / "flat-lora" / "samples" / "step_000000").exists()
    assert not (out / "base-model-pictures").exists()  # filed, not left beside the runs

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one after the other: the first run draws them itself
    assert demo.main(args) == 0
    by_trainer = {f.name: np.asarray(Image.open(f)) for f in sorted(step_zero.glob("*.png"))}
    assert by_trainer.keys() == side_by_side.keys()
    for name, pixels in by_trainer.items():
        assert np.array_equal(pixels, side_by_side[name]), name
    assert len({p.tobytes() for p in by_trainer.values()}) == 4  # four different pictures, not one repeated
