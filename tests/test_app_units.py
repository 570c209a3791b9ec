"""The web app's parts without a server: the form generated from TrainConfig, presets, run creation with
uploads and typed paths (safe names, nothing outside the runs folder), and reading run folders."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from app import form, runs, submit
from flatlora_diffusion.config import ConfigError, TrainConfig, make_config
from flatlora_diffusion.tiny import make_subject_images


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture
def images(tmp_path):
    return make_subject_images(tmp_path / "images", n=2, size=32)


def base_values(**over):
    v = {"pretrained_model_name_or_path": "org/model", "instance_prompt": "a photo of sks toy",
         "max_train_steps": 5, "resolution": 64}
    v.update(over)
    return v


# --- the form ------------------------------------------------------------------------------------------
def test_every_setting_is_in_the_form_or_deliberately_left_out():
    shown = {s.name for s in form.form_fields()}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if f.name in form.APP_MANAGED or meta.get("secret") or meta.get("hidden"):
            assert f.name not in shown
        else:
            assert f.name in shown, f.name
    specs = form.form_fields()
    prominent = [s.name for s in specs if s.prominent]
    assert prominent == [n for n in form.PROMINENT if n in shown]
    assert specs[: len(prominent)] == [s for s in specs if s.prominent]  # prominent fields come first
    kinds = {s.name: s.kind for s in specs}
    assert kinds["with_prior_preservation"] == "checkbox"
    assert kinds["flat_schedule"] == "dropdown" and kinds["mixed_precision"] == "dropdown"
    assert kinds["flat_targets"] == "checkboxgroup"
    assert kinds["validation_prompt"] == "lines" and kinds["validation_seeds"] == "text"
    assert kinds["rank"] == "number" and kinds["learning_rate"] == "text"  # optional: empty = default
    assert all(s.help for s in specs)


def test_widget_values_round_trip_to_the_same_config():
    defaults = form.widgets_from_values({})
    values = form.values_from_widgets(defaults)
    # the form starts from diffusers' defaults except where config.py gives a form_default (a run that trains
    # and validates, see app/plan.py; cached latents)
    assert values["max_train_steps"] == 500 and values["validation_epochs"] is None and values["cache_latents"] is True
    assert make_config({**values, **base_values(), "instance_data_dir": "/x"}) == \
        make_config({**base_values(), "instance_data_dir": "/x", "validation_epochs": None, "cache_latents": True})
    widgets = dict(defaults)
    widgets.update(validation_prompt="a photo of sks toy\n\n a sks toy, on the beach ", validation_seeds="3, 4,5",
                   learning_rate="5e-4", mixed_precision=form.DEFAULT_CHOICE, lora_target_modules="to_q, to_v",
                   rank=8.0, seed="", flat_targets=["unet"])
    v = form.values_from_widgets(widgets)
    assert v["validation_prompt"] == ["a photo of sks toy", "a sks toy, on the beach"]
    assert v["validation_seeds"] == ["3", "4", "5"]
    assert v["lora_target_modules"] == ["to_q", "to_v"]
    assert v["mixed_precision"] is None and v["seed"] is None and v["rank"] == 8
    cfg = make_config({**v, **{k: x for k, x in base_values().items() if k != "max_train_steps"},
                       "instance_data_dir": "/x"})
    assert cfg.validation_seeds == [3, 4, 5] and cfg.learning_rate == 5e-4
    back = form.widgets_from_values(dataclasses.asdict(cfg))
    assert back["validation_seeds"] == "3, 4, 5" and back["learning_rate"] == "0.0005"
    with pytest.raises(ConfigError, match="rank"):
        form.values_from_widgets({"rank": 2.5})
    with pytest.raises(ConfigError, match="unknown"):
        form.values_from_widgets({"output_dir": "/etc"})


def test_presets_are_short_yaml_and_load_back(tmp_path):
    values = form.values_from_widgets(form.widgets_from_values({}))
    values.update(rank=16, flat_sigma=0.05, validation_prompt=["a", "b"])
    text = form.preset_yaml(values)
    assert yaml.safe_load(text) == {"rank": 16, "flat_sigma": 0.05, "validation_prompt": ["a", "b"]}
    path = tmp_path / "p.yaml"
    path.write_text(text)
    loaded, ignored = form.load_preset(path)
    assert loaded == {"rank": 16, "flat_sigma": 0.05, "validation_prompt": ["a", "b"]} and ignored == []
    # a run's config.yaml works as a preset; the app-managed keys are reported, not taken over
    path.write_text(yaml.safe_dump({"rank": 2, "output_dir": "/somewhere", "logging_dir": "logs"}))
    loaded, ignored = form.load_preset(path)
    assert loaded == {"rank": 2} and ignored == ["logging_dir", "output_dir"]
    path.write_text("rnak: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        form.load_preset(path)


# --- creating runs ------------------------------------------------------------------------------------
def test_uploads_are_decoded_and_stored_under_safe_names(tmp_path, images):
    runs_dir = tmp_path / "runs"
    odd = tmp_path / "up" / "weird name;rm -rf.PNG"
    odd.parent.mkdir()
    odd.write_bytes(images[0].read_bytes())
    jpeg = tmp_path / "photo.jpeg.exe"  # a JPEG whatever its name says
    from PIL import Image

    Image.open(images[1]).convert("RGB").save(jpeg, format="JPEG")
    shown = ["../../../etc/evil.png", jpeg.name]  # the names a browser reports are never used as paths
    names = submit.prepare_runs(runs_dir, base_values(), name="../../my run!", uploads=[odd, jpeg],
                                upload_names=shown)
    assert names == ["my-run"]
    run = runs_dir / "my-run"
    assert sorted(p.name for p in (run / "instance_images").iterdir()) == ["image_000.png", "image_001.jpg"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert set(cfg) <= set(TrainConfig.field_names())
    assert cfg["instance_data_dir"] == str(run / "instance_images") and cfg["output_dir"] == str(run)
    assert json.loads((run / "status.json").read_text())["state"] == "queued"
    assert json.loads((run / "app.json").read_text())["uploaded_images"] == shown
    # nothing written next to the runs folder, nothing but the run inside it
    assert listing(runs_dir) == {"my-run", *(f"my-run/{x}" for x in listing(run))}
    assert not [p for p in tmp_path.iterdir() if p.name not in ("runs", "images", "up", "photo.jpeg.exe")]


@pytest.mark.parametrize("kind", ["text", "truncated", "gif", "tiny"])
def test_non_images_are_refused_and_nothing_is_written(tmp_path, images, kind):
    from PIL import Image

    runs_dir = tmp_path / "runs"
    bad = tmp_path / "bad.png"
    if kind == "text":
        bad.write_text("#!/bin/sh\necho not an image\n")
    elif kind == "truncated":
        bad.write_bytes(images[0].read_bytes()[:300])
    elif kind == "gif":
        Image.new("RGB", (32, 32)).save(bad, format="GIF")
    else:
        Image.new("RGB", (4, 4)).save(bad, format="PNG")
    with pytest.raises(submit.SubmitError, match="bad.png"):
        submit.prepare_runs(runs_dir, base_values(), uploads=[images[0], bad])
    assert listing(runs_dir) == set()


def test_typed_folders_are_checked(tmp_path, images):
    runs_dir = tmp_path / "runs"
    folder = str(images[0].parent)
    ok = submit.prepare_runs(runs_dir, base_values(instance_data_dir=folder), name="typed")
    assert yaml.safe_load((runs_dir / ok[0] / "config.yaml").read_text())["instance_data_dir"] == folder
    assert not (runs_dir / ok[0] / "instance_images").exists()  # a typed folder is only read
    before = listing(runs_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ({"instance_data_dir": str(tmp_path / "missing")}, "does not exist"),
        ({"instance_data_dir": str(images[0])}, "not a folder"),
        ({"instance_data_dir": "relative/path"}, "absolute"),
        ({"instance_data_dir": str(empty)}, "no images"),
        ({"instance_data_dir": folder, "instance_prompt": None}, "caption"),
        ({}, "no training images"),
        ({"instance_data_dir": folder, "pretrained_model_name_or_path": str(tmp_path / "nope.safetensors")},
         "does not exist"),
        ({"instance_data_dir": folder, "rank": 0}, "rank"),
    ]
    for over, message in cases:
        with pytest.raises((submit.SubmitError, ConfigError), match=message):
            submit.prepare_runs(runs_dir, base_values(**over))
    assert listing(runs_dir) == before


def test_class_images_stay_inside_the_runs_folder(tmp_path, images):
    runs_dir = tmp_path / "runs"
    v = base_values(instance_data_dir=str(images[0].parent), with_prior_preservation=True,
                    class_prompt="a photo of a toy", num_class_images=3)
    [name] = submit.prepare_runs(runs_dir, v)
    assert yaml.safe_load((runs_dir / name / "config.yaml").read_text())["class_data_dir"] == \
        str(runs_dir / name / "class_images")
    outside = tmp_path / "class"
    make_subject_images(outside, n=2, size=32)
    with pytest.raises(submit.SubmitError, match="would generate"):
        submit.prepare_runs(runs_dir, {**v, "class_data_dir": str(outside)})
    make_subject_images(outside / "more", n=1, size=32)
    (outside / "more" / "subject_00.png").rename(outside / "extra.png")
    [name2] = submit.prepare_runs(runs_dir, {**v, "class_data_dir": str(outside)})  # enough: only read
    assert yaml.safe_load((runs_dir / name2 / "config.yaml").read_text())["class_data_dir"] == str(outside)


def test_ab_makes_two_runs_that_differ_only_in_sigma(tmp_path, images):
    runs_dir = tmp_path / "runs"
    names = submit.prepare_runs(runs_dir, base_values(flat_sigma=0.2), name="cmp", ab=True, uploads=images)
    assert names == ["cmp-lora", "cmp-flat"]
    a, b = (yaml.safe_load((runs_dir / n / "config.yaml").read_text()) for n in names)
    assert a["flat_sigma"] == 0.0 and b["flat_sigma"] == 0.2
    assert isinstance(a["seed"], int) and a["seed"] == b["seed"]
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"flat_sigma", "output_dir", "instance_data_dir"}
    metas = [json.loads((runs_dir / n / "app.json").read_text()) for n in names]
    assert [m["ab_group"] for m in metas] == ["cmp", "cmp"]
    assert [m["ab_variant"] for m in metas] == ["lora", "flat"]
    # the names are taken: the next pair gets another prefix, and sigma 0 cannot be an A/B
    assert submit.prepare_runs(runs_dir, base_values(), name="cmp", ab=True, uploads=images) == \
        ["cmp-2-lora", "cmp-2-flat"]
    with pytest.raises(submit.SubmitError, match="flat_sigma > 0"):
        submit.prepare_runs(runs_dir, base_values(flat_sigma=0.0), ab=True, uploads=images)
    group = runs.group_runs(runs.list_runs(runs_dir), "cmp-flat")
    assert [r.name for r in group] == ["cmp-lora", "cmp-flat"]


# --- reading runs -------------------------------------------------------------------------------------
def test_run_folders_are_read_tolerantly(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "samples" / "step_000000").mkdir(parents=True)
    (run_dir / "samples" / "step_000004.partial").mkdir()
    (run_dir / "samples" / "step_000004.partial" / "0_1.png").write_bytes(b"x")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(run_dir / "samples" / "step_000000" / "0_7.png")
    (run_dir / "samples" / "prompts.json").write_text(json.dumps({"0": "a photo"}))
    (run_dir / "status.json").write_text('{"state": "runn')  # torn (never happens: atomic), still no crash
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    (run_dir / "train.log").write_bytes(b"start\nSteps: 10%\rSteps: 20%\rSteps: 30%\nlast line\n")
    (tmp_path / "runs" / ".presets").mkdir()
    (tmp_path / "runs" / "not-a-run").mkdir()
    run = runs.get_run(tmp_path / "runs", "r1")
    assert run.state == "unknown"
    assert [m["step"] for m in run.metrics()] == [1, 2]
    assert run.sample_steps() == [0] and run.prompts() == {0: "a photo"}
    assert list(run.samples_at(0)) == [(0, 7)]
    assert run.log_tail(3) == "Steps: 30%\nlast line"
    assert [r.name for r in runs.list_runs(tmp_path / "runs")] == ["r1"]
    for bad in ("../r1", "", ".presets", "not-a-run", "/etc"):
        with pytest.raises(KeyError):
            runs.get_run(tmp_path / "runs", bad)
    run.update_status(state="cancelled", message="x")
    st = json.loads((run_dir / "status.json").read_text())
    assert st["state"] == "cancelled" and st["finished_at"]
    assert runs.format_eta(75) == "1:15" and runs.format_eta(3725) == "1:02:05" and runs.format_eta(None) == "–"
    assert runs.safe_name("../..") == "run" and runs.safe_name("a b/c") == "a-b-c"
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert os.access(run_dir / "status.json", os.R_OK)


def test_cli_app_subcommand_reaches_app_main(capsys):
    from flatlora_diffusion.cli import main

    with pytest.raises(SystemExit) as e:
        main(["app", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--runs-dir" in out and "--auth" in out and "127.0.0.1" in out


def test_loss_chart_svg():
    import xml.etree.ElementTree as ET

    from app.chart import loss_svg, smooth

    empty = loss_svg([])
    assert "data-lines='0'" in empty and "<svg" not in empty
    a = [(i, 1.0 / i) for i in range(1, 31)]
    b = [(1, 0.5)]
    out = loss_svg([("run <a> (LoRA)", a), ("b", b), ("nothing yet", []), ("nan", [(1, float("nan"))])])
    assert "data-lines='2'" in out
    svg = ET.fromstring(out[out.index("<svg"):out.rindex("</svg>") + 6])  # well-formed, labels escaped
    ns = "{http://www.w3.org/2000/svg}"
    runs = [p for p in svg.iter(ns + "polyline") if p.get("class") == "run"]
    assert [p.get("data-run") for p in runs] == ["run <a> (LoRA)", "b"]
    assert len(runs[0].get("points").split()) == 30 and len(runs[1].get("points").split()) == 1
    assert sum(1 for p in svg.iter(ns + "polyline") if p.get("class") == "raw") == 1  # 30 points: smoothed too
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])


def test_form_labels_come_from_config_and_name_the_setting_in_the_help():
    from flatlora_diffusion.config import field_label

    for spec in form.form_fields():
        assert spec.label == field_label(spec.name)
        assert "_" not in spec.label and not spec.label[0].islower(), spec.name  # words, not identifiers
        assert spec.info.endswith(f"(--{spec.name})")
    assert field_label("learning_rate") == "Learning rate"
    assert len({s.label for s in form.form_fields()}) == len(form.form_fields())  # no two fields look alike


# --- the run plan and the form's empty boxes --------------------------------------------------------------
def test_empty_boxes_make_a_run_that_trains_and_validates(tmp_path, images):
    from app import plan

    empty = form.values_from_widgets({"max_train_steps": "", "validation_prompt": "", "validation_steps": "",
                                      "validation_epochs": "", "train_batch_size": 4})
    values = {**base_values(), **empty}
    # 5 images at batch 4: diffusers' empty max steps (one epoch) would be 2 steps; the form means 500
    r = plan.resolve(values, images=5)
    assert r["max_train_steps"] == 500 and r["validation_steps"] == 125
    assert r["validation_prompt"] == ["a photo of sks toy"]
    assert plan.resolve({**values, "num_train_epochs": 3}, images=5)["max_train_steps"] == 6  # epochs asked for
    assert plan.resolve({**values, "validation_epochs": 10}, images=5).get("validation_steps") is None
    # and that is what the run folder gets
    [name] = submit.prepare_runs(tmp_path / "runs", {**values, "instance_data_dir": str(images[0].parent)})
    cfg = yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())
    assert (cfg["max_train_steps"], cfg["validation_steps"], cfg["validation_epochs"]) == (500, 125, None)
    assert cfg["validation_prompt"] == ["a photo of sks toy"]


def test_the_plan_counts_steps_validations_and_time(tmp_path):
    from app import plan

    v = base_values(max_train_steps=None, repeats=2, train_batch_size=4, validation_seeds=[0, 1])
    p = plan.make_plan(v, images=5, runs=2, runs_dir=tmp_path)
    assert (p.steps_per_epoch, p.total_steps, p.epochs) == (3, 500, 167)  # ceil(5 x 2 / 4) = 3 per epoch
    assert p.validation_at == [0, 125, 250, 375, 500] and p.images_per_validation == 2
    no_start = plan.make_plan({**v, "validate_at_start": False}, images=5, runs=2, runs_dir=tmp_path)
    assert no_start.validation_at == [125, 250, 375, 500]
    assert p.seconds_per_step is None and not p.warnings
    text = plan.plan_markdown(p)
    assert "3 steps per epoch" in text and "500 training steps" in text and "0, 125, 250, 375, 500" in text
    short = plan.make_plan(base_values(max_train_steps=20, instance_prompt=None), images=5)
    assert any("Only 20" in w for w in short.warnings) and any("No validation prompt" in w for w in short.warnings)
    # an earlier run on this machine with the same model and batch measured 0.5 s/step: 2 runs x 500 steps
    run = tmp_path / "earlier"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"pretrained_model_name_or_path": "org/model",
                                                     "train_batch_size": 4, "resolution": 64}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 0.1, "it_per_s": 2.0}) + "\n")
    p = plan.make_plan(v, images=5, runs=2, runs_dir=tmp_path)
    assert p.seconds_per_step == 0.5 and p.speed_from == "earlier" and p.estimated_seconds == 500.0
    assert "about 8 min" in plan.plan_markdown(p)
    other = plan.make_plan({**v, "resolution": 1024}, images=5, runs_dir=tmp_path)
    assert other.seconds_per_step is None  # measured at another resolution: no guess


def test_uploaded_captions_are_stored_beside_their_images(tmp_path, images):
    from flatlora_diffusion.data import scan_image_folder

    up = tmp_path / "up"
    up.mkdir()
    caption = up / "dog.txt"
    caption.write_bytes("\ufeffa photo of sks dog on a sofa\nsecond line\n".encode())
    runs_dir = tmp_path / "runs"
    # no instance prompt is needed when every image has its caption; the names are the browser's
    [name] = submit.prepare_runs(runs_dir, base_values(instance_prompt=None), uploads=[images[0], caption],
                                 upload_names=["dog.png", "dog.txt"])
    folder = runs_dir / name / "instance_images"
    assert sorted(p.name for p in folder.iterdir()) == ["image_000.png", "image_000.txt"]
    records = scan_image_folder(folder, None)  # the trainer's own reading
    assert [r.caption for r in records] == ["a photo of sks dog on a sofa"]
    bad = tmp_path / "bad.txt"
    cases = [
        (["cat.png", "dog.txt"], "no uploaded image is called dog"),
        (["dog.png", "bad.txt"], "no uploaded image is called bad"),
    ]
    for shown, message in cases:
        with pytest.raises(submit.SubmitError, match=message):
            submit.prepare_runs(runs_dir, base_values(), uploads=[images[0], caption], upload_names=shown)
    bad.write_bytes(b"\xff\xfe not utf-8 \xff")
    with pytest.raises(submit.SubmitError, match="UTF-8"):
        submit.prepare_runs(runs_dir, base_values(), uploads=[images[0], bad], upload_names=["bad.png", "bad.txt"])
    with pytest.raises(submit.SubmitError, match="image_b.png has no caption"):
        submit.prepare_runs(runs_dir, base_values(instance_prompt=None), uploads=[images[0], caption, images[1]],
                            upload_names=["dog.png", "dog.txt", "image_b.png"])
    assert [p.name for p in runs_dir.iterdir()] == [name]


def test_runs_are_deleted_and_renamed_only_when_idle(tmp_path, images):
    from app import manage

    runs_dir = tmp_path / "runs"
    [name] = submit.prepare_runs(runs_dir, base_values(), name="old", uploads=images)
    run = runs_dir / name
    for state in ("queued", "running"):  # waiting or training: refused, nothing moves
        runs.get_run(runs_dir, name).update_status(state=state)
        with pytest.raises(manage.RunBusy, match=f"old is {state}: cancel it first"):
            manage.delete_run(runs_dir, name)
        with pytest.raises(manage.RunBusy, match="cancel it first"):
            manage.rename_run(runs_dir, name, "new")
    runs.get_run(runs_dir, name).update_status(state="completed")
    with pytest.raises(manage.RunBusy):  # the launcher still has it
        manage.delete_run(runs_dir, name, queued_or_running=True)
    from flatlora_diffusion.run_dir import TrainerLock

    lock = TrainerLock(run).acquire()  # a trainer started by hand holds the folder
    try:
        with pytest.raises(manage.RunBusy, match="training"):
            manage.delete_run(runs_dir, name)
    finally:
        lock.release()
    assert manage.disk_usage(run) == sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) > 0
    assert manage.format_size(1536) == "1.5 KB" and manage.format_size(10) == "10 B"
    # rename: the folder moves and config.yaml's paths into it follow (the run can be resumed there)
    assert manage.rename_run(runs_dir, name, "my new name") == "my-new-name"
    cfg = yaml.safe_load((runs_dir / "my-new-name" / "config.yaml").read_text())
    assert cfg["output_dir"] == str(runs_dir / "my-new-name")
    assert cfg["instance_data_dir"] == str(runs_dir / "my-new-name" / "instance_images")
    make_config(cfg)  # still a valid config
    [other] = submit.prepare_runs(runs_dir, base_values(), name="other", uploads=images)
    with pytest.raises(ValueError, match="exists already"):
        manage.rename_run(runs_dir, other, "my-new-name")
    with pytest.raises(KeyError):
        manage.delete_run(runs_dir, "../runs")
    assert manage.delete_run(runs_dir, "my-new-name") == "Deleted my-new-name."
    assert sorted(p.name for p in runs_dir.iterdir()) == ["other"]
