"""Toy-world scores in `evaluate`: the arithmetic on synthetic verdicts, the base model (no subject) against a
real DreamBooth run on the toy world (the subject), held-out renders without --eval_data_dir, and bit-identical
numbers when evaluated twice."""

import json
from pathlib import Path

import pytest
from PIL import Image

from flatlora_diffusion.evaluation import toyscores
from flatlora_diffusion.evaluation.evaluate import EvalOptions, evaluate
from flatlora_diffusion.evaluation.runs import inspect_run, load_base
from flatlora_diffusion.toyworld import model_dir
from flatlora_diffusion.toyworld.judge import Verdict

SMALL = dict(samples=3, seeds=[0, 1, 2], draws=1, rhos=(0.1,), triples=4)


def _v(colour="red", subject=False, scene="plain", shape="toy"):
    """A verdict; subject=True: the subject's look (a green striped toy), whatever colour is asked."""
    if subject:
        return Verdict(shape="toy", colour="green", pattern="striped", scene=scene)
    return Verdict(shape=shape, colour=colour, pattern="plain", scene=scene)


# --- arithmetic ---------------------------------------------------------------------------------------------
def test_class_collapse_and_colour_shift_on_synthetic_verdicts():
    base = [_v("red"), _v("red"), _v("blue"), _v("green")]
    run = [_v("red"), _v(subject=True), _v(subject=True), _v("green", shape="circle")]
    s = toyscores.class_scores(run, base)
    assert s["class_collapse"] == 0.5  # two of four judged the subject
    assert s["class_toy"] == 0.75  # the circle is no toy
    # histograms: run {red .25, subject .5, green .25}, base {red .5, blue .25, green .25}
    assert s["class_colour_tv"] == pytest.approx(0.5 * (0.25 + 0.5 + 0.25))
    assert toyscores.class_scores(base, base) == {"class_collapse": 0.0, "class_toy": 1.0, "class_colour_tv": 0.0}
    # a subject verdict is its own bin, not its colour's
    assert toyscores.colour_histogram([_v(subject=True)])["green"] == 0.0
    assert toyscores.colour_histogram([_v("green")])["green"] == 1.0


def test_prompt_scores_and_diversity():
    vs = [_v(subject=True, scene="beach"), _v(subject=True, scene="snow"), _v(subject=False, scene="snow")]
    assert toyscores.prompt_scores(vs, ["beach", "beach", "snow"]) == pytest.approx(
        {"subject": 2 / 3, "scene": 2 / 3, "subject_scene": 1 / 3})
    black, white = Image.new("RGB", (8, 8), "black"), Image.new("RGB", (8, 8), "white")
    assert toyscores.pixel_diversity([black, black]) == 0.0
    assert toyscores.pixel_diversity([black, white]) == 1.0
    assert toyscores.pixel_diversity([black, white, white]) == pytest.approx(2 / 3)  # pairs: 1, 1, 0


def test_toyworld_runs_are_recognized_by_name_or_folder():
    class R:
        def __init__(self, name):
            self.config = {"pretrained_model_name_or_path": name}

    assert toyscores.is_toyworld(R("toyworld")) and toyscores.is_toyworld(R(str(model_dir())))
    assert not toyscores.is_toyworld(R("runwayml/stable-diffusion-v1-5"))
    assert not toyscores.is_toyworld(R("/nowhere/toyworld"))


# --- a real toy-world run -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The demo's DreamBooth task, plain LoRA, as recipe.py defines it (100 steps; at 60 the subject is still half
    learnt)."""
    from accelerate.state import AcceleratorState

    from flatlora_diffusion.config import make_config
    from flatlora_diffusion.toyworld.recipe import dreambooth_settings, write_task_data
    from flatlora_diffusion.train import train

    base = tmp_path_factory.mktemp("toy")
    instance, class_images = write_task_data(base, seed=0)
    try:
        return train(make_config(dreambooth_settings(base / "run", instance, class_images, flat_sigma=0.0))).path
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the next run builds its own Accelerator


def _numbers(record):
    return {k: record[k] for k in ("loss", "sharpness", "image_scores", "toyworld")}


def test_trained_run_shows_the_subject_the_base_model_does_not_and_numbers_repeat(toy_run):
    record, = evaluate([str(toy_run)], EvalOptions(**SMALL))
    scores = record["image_scores"]
    assert set(toyscores.SCORE_NAMES) <= set(scores)
    # the base model, same seeds and prompts, no LoRA: it has never seen the subject
    components = load_base(inspect_run(toy_run), "cpu")
    base_images = toyscores.toy_generator(components)(["a photo of a toy"] * 3, [0, 1, 2])
    from flatlora_diffusion.toyworld.judge import load_judge

    base_scores, _ = toyscores.toyworld_scores(toyscores.toy_generator(components), base_images, load_judge(),
                                               [0, 1, 2])
    assert base_scores["subject"] == 0.0 and base_scores["subject_new"] <= 1 / 12
    assert base_scores["class_collapse"] == 0.0 and base_scores["class_colour_tv"] == 0.0  # itself vs itself
    # the shipped world gives 3 of 3 and 9 of 12 (the base model 0 and 0)
    assert scores["subject"] >= 2 / 3 and scores["subject"] > base_scores["subject"]
    assert scores["subject_new"] >= 2 / 3 and scores["subject_new"] > base_scores["subject_new"]
    details = record["toyworld"]
    assert list(details["per_scene"]) == ["plain", "beach", "snow", "night", "grass"]
    assert scores["subject_new"] == pytest.approx(
        sum(details["per_scene"][s]["subject"] for s in details["new_scenes"]) / 4)
    assert details["pictures"] == 6 * 3 + 3  # 5 scenes + the class prompt, and the base model's class pictures
    # held-out subject renders without --eval_data_dir: the gap is reported, sharpness measured on them
    assert record["settings"]["images"] == {"instance": 5, "heldout": 8}
    assert record["loss"]["gap"] == pytest.approx(record["loss"]["heldout"] - record["loss"]["instance"])
    assert record["sharpness"]["split"] == "heldout"
    # the same seeds give the same pictures: identical numbers in another call (base class pictures made again;
    # unloading between runs of one call is tested in test_evaluate.py on the same code path)
    again, = evaluate([str(toy_run)], EvalOptions(**SMALL))
    assert _numbers(record) == _numbers(again)
    on_disk = json.loads((Path(toy_run) / "eval.json").read_text())
    assert on_disk["image_scores"] == scores and on_disk["settings"]["toyworld"]["sample_steps"] == 20


