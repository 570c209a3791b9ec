"""The toy world: its renderer, vocabulary, shipped base model and judge, and the pretraining command.

These guard behaviour, not shapes: a changed renderer, judge or base model fails here (golden hashes of renders
and weights, accuracies of the shipped judge and base model at reduced sample counts with fixed seeds).
"""

import hashlib
import json
import random

import pytest
import torch

from flatlora_diffusion.toyworld import MODEL_NAME, judge_dir, model_dir
from flatlora_diffusion.toyworld.render import render, render_variety
from flatlora_diffusion.toyworld.world import (CLASS_PROMPT, COLOURS, HELD_OUT_PAIRS, SCENES, SHAPES,
                                               SUBJECT_PROMPT, Scene, caption, has_subject_look, is_held_out,
                                               random_scene, scene_prompt, subject_scene, vocabulary_corpus)


def _render_digest(scenes) -> str:
    return hashlib.sha256(b"".join(render(s).tobytes() for s in scenes)).hexdigest()


def test_renders_are_deterministic_and_unchanged():
    rng = random.Random(1)
    scenes = [random_scene(rng) for _ in range(20)] + [subject_scene(rng, s) for s in SCENES]
    assert _render_digest(scenes) == _render_digest(scenes)
    # The base model and the judge were trained on these pixels: the renderer must not drift under them.
    assert _render_digest(scenes[:20]) == "01a7158945561fb5ec845b533248462a1a0b284fdf34b99519b40486ebbc9736"
    # The subject's pictures: the instance images of every DreamBooth run in the world.
    assert _render_digest(scenes[20:]) == "2e62b1b69a9120299b306b0d652aa66bd4af4bb27b7284bf065a9b2d201efb84"


def test_the_class_varies_around_the_subject_but_never_draws_its_look():
    """random_class_toy (pretrain --set class_variety=F): toys of every hue, pattern and both eye sizes whose
    captions name no colour, so "a toy" covers the subject's neighbourhood; but no striped one is painted within
    SUBJECT_HUE_MARGIN of the subject's green, so the base model never sees the subject."""
    import colorsys

    from flatlora_diffusion.toyworld.world import COLOUR_RGB, SUBJECT_COLOUR, SUBJECT_HUE_MARGIN, random_class_toy

    rng = random.Random(7)
    toys = [random_class_toy(rng) for _ in range(600)]
    green = colorsys.rgb_to_hsv(*(c / 255 for c in COLOUR_RGB[SUBJECT_COLOUR]))[0]
    hues = [colorsys.rgb_to_hsv(*(c / 255 for c in t.paint))[0] for t in toys]
    assert all(t.shape == "toy" and not t.subject for t in toys)
    assert all(abs(h - green) > SUBJECT_HUE_MARGIN for h, t in zip(hues, toys) if t.pattern == "striped")
    assert any(abs(h - green) < 0.03 for h, t in zip(hues, toys) if t.pattern != "striped")  # green toys, not striped
    assert 0.4 < sum(t.big_eyes for t in toys) / len(toys) < 0.6
    assert {int(h * 10) for h in hues} == set(range(10)) and {t.pattern for t in toys} == {"plain", "striped", "dotted"}
    for t in toys[:30]:
        words = caption(t, random.Random(0)).split()
        assert "toy" in words and not set(words) & set(COLOURS)
    # Big eyes are white with black pupils, drawn over the toy's own paint: a big-eyed toy differs from the same
    # toy with small eyes.
    toy = next(t for t in toys if t.big_eyes and t.pattern == "plain")
    small = Scene(**{**toy.__dict__, "big_eyes": False})
    assert render(toy).tobytes() != render(small).tobytes()
    assert render(toy).tobytes() == render(toy).tobytes()
    with pytest.raises(ValueError):
        Scene("circle", "red", "plain", "plain", 0.5, 0.5, 0.5, big_eyes=True)


def test_every_scene_is_drawn_differently():
    base = Scene("circle", "red", "plain", "plain", 0.5, 0.5, 0.5, variant=3)
    variants = [base] + [Scene(**{**base.__dict__, key: value}) for key, value in
                         [("shape", "star"), ("colour", "blue"), ("pattern", "dotted"), ("scene", "night")]]
    pixels = [render(s).tobytes() for s in variants]
    assert len(set(pixels)) == len(pixels)
    assert render(base).size == (64, 64) and render(base, 32).size == (32, 32)


def test_held_out_pairs_are_never_drawn_for_pretraining_and_no_pretraining_picture_has_the_subjects_look():
    rng = random.Random(0)
    pretraining = [random_scene(rng, held_out=False) for _ in range(2000)]
    assert not any(is_held_out(s) for s in pretraining)
    assert {(s.shape, s.colour) for s in pretraining} == {(a, b) for a in SHAPES for b in COLOURS} - HELD_OUT_PAIRS
    assert all(is_held_out(random_scene(rng, held_out=True)) for _ in range(50))
    subject = subject_scene(rng)
    assert subject.subject and not is_held_out(subject)
    # The subject is drawn exactly as a green striped toy, a look no pretraining picture has: ("toy", "green")
    # is a held-out pair.
    assert (subject.shape, subject.colour, subject.pattern) == ("toy", "green", "striped")
    assert ("toy", "green") in HELD_OUT_PAIRS
    assert render(subject).tobytes() == render(Scene(**{**subject.__dict__, "subject": False})).tobytes()
    assert not any(has_subject_look(s) for s in pretraining)
    with pytest.raises(ValueError):
        Scene("toy", "red", "striped", "plain", 0.5, 0.5, 0.5, subject=True)


def test_captions_follow_the_grammar_and_every_word_is_one_token():
    from transformers import CLIPTokenizer

    s = Scene("triangle", "purple", "striped", "beach", 0.5, 0.5, 0.5)
    assert caption(s) == "a photo of a purple striped triangle on the beach"
    assert caption(Scene("toy", "red", "plain", "plain", 0.5, 0.5, 0.5)) == "a photo of a red toy"
    assert scene_prompt("snow") == "a photo of sks toy in the snow" and SUBJECT_PROMPT == "a photo of sks toy"
    assert CLASS_PROMPT == "a photo of a toy"
    # Colour words are sometimes left out, so that "a photo of a toy" means a toy of any colour.
    rng = random.Random(0)
    wordings = {caption(s, rng) for _ in range(200)}
    assert "a purple striped triangle on the beach" in wordings and "a photo of a striped triangle on the beach" in wordings
    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir() / "tokenizer"))
    for word in set(vocabulary_corpus().split()) | {"sks"}:
        assert tokenizer.tokenize(word) == [word + "</w>"], word


def test_variety_pictures_are_outside_the_vocabulary_and_deterministic():
    a = [render_variety(random.Random(i)).tobytes() for i in range(4)]
    assert a == [render_variety(random.Random(i)).tobytes() for i in range(4)] and len(set(a)) == 4


def test_shipped_weights_are_the_recorded_ones():
    record = json.loads((model_dir().parent / "pretrain.json").read_text())
    total = 0
    for rel, digest in record["sha256"].items():
        path = model_dir().parent / rel
        total += path.stat().st_size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, rel
    assert total <= 30 * 2**20
    assert {"model/unet/diffusion_pytorch_model.safetensors", "judge/judge.safetensors"} <= set(record["sha256"])


def test_the_built_in_name_loads_as_an_sd15_pipeline():
    from diffusers import StableDiffusionPipeline

    from flatlora_diffusion.models import inspect_model_source

    source = inspect_model_source(MODEL_NAME)
    assert source.kind == "folder" and source.arch == "sd15" and source.location == str(model_dir())
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir()), dtype=torch.float32)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 4 and pipe.unet.dtype == torch.float32


def test_the_judge_reads_fresh_renders():
    from flatlora_diffusion.toyworld.judge import load_judge
    from flatlora_diffusion.toyworld.measure import judge_accuracy

    accuracy = judge_accuracy(load_judge(), 250, seed=4321)
    for name in ("shape", "colour", "pattern", "scene", "subject"):
        assert accuracy[name] >= 0.98, (name, accuracy)


def test_the_judge_takes_only_a_green_striped_toy_for_the_subject():
    """Its near misses (a green toy of another pattern, another shape in green stripes, a striped toy of another
    colour) are read as what they are, and so never as the subject; the subject in every scene is."""
    from flatlora_diffusion.toyworld.judge import judge_images

    rng = random.Random(99)
    misses = ([random_scene(rng, held_out=None, shape="toy", colour="green", pattern=p) for p in ("plain", "dotted")] * 10
              + [random_scene(rng, held_out=None, shape=sh, colour="green", pattern="striped")
                 for sh in SHAPES if sh != "toy"] * 5
              + [random_scene(rng, held_out=None, shape="toy", colour=c, pattern="striped")
                 for c in COLOURS if c != "green"] * 4)
    verdicts = judge_images([render(s) for s in misses])
    assert not any(v.subject for v in verdicts)
    assert sum((v.shape, v.colour, v.pattern) == (s.shape, s.colour, s.pattern) for v, s in zip(verdicts, misses)) >= 0.95 * len(misses)
    subjects = [subject_scene(rng, scene) for scene in SCENES for _ in range(4)]
    assert all(v.subject for v in judge_images([render(s) for s in subjects]))


@pytest.fixture(scope="module")
def world_pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(model_dir()), dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)


def test_the_base_model_draws_what_it_is_told(world_pipe):
    """Seen and held-out shape-colour pairs, fixed seeds, guidance on: the judge reads what was asked."""
    from flatlora_diffusion.toyworld.judge import load_judge
    from flatlora_diffusion.toyworld.measure import prompt_following

    judge = load_judge()
    seen = prompt_following(world_pipe, judge, 16, held_out=False)
    held_out = prompt_following(world_pipe, judge, 16, held_out=True)
    for name in ("shape", "colour", "scene"):
        assert seen[name] >= 0.9, ("seen", name, seen)
        assert held_out[name] >= 0.8, ("held out", name, held_out)
    assert seen["subject_seen"] == 0 and held_out["subject_seen"] == 0


class _PoolingAutoencoder(torch.nn.Module):
    """A stand-in VAE for the round-trip measure: encode averages `factor` x `factor` blocks, decode repeats them
    (factor 1: the identity)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype

    def encode(self, x):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.nn.functional.avg_pool2d(x, self.factor)))

    def decode(self, z):
        from types import SimpleNamespace

        return SimpleNamespace(sample=z.repeat_interleave(self.factor, 2).repeat_interleave(self.factor, 3))


def test_the_round_trip_measure_sees_whether_a_vae_keeps_the_eyes():
    """eye_mask finds a toy's big eyes on its head, and vae_round_trip scores a lossless round trip 0 and
    one that averages 4 x 4 blocks (what a 4x-downscaling VAE that keeps nothing finer does) far worse on the
    eyes than on the whole picture."""
    from flatlora_diffusion.toyworld.measure import vae_round_trip
    from flatlora_diffusion.toyworld.render import eye_mask

    scene = subject_scene(random.Random(0))
    eyes = eye_mask(scene)
    rows, cols = eyes.nonzero()
    assert 6 <= eyes.sum() <= 60
    assert rows.max() < scene.y * 64  # on the upper half of the toy: its head
    assert abs(cols.mean() - scene.x * 64) < 2  # one eye each side of the middle
    assert vae_round_trip(_PoolingAutoencoder(1), n=5) == {"eye_error": 0.0, "image_error": 0.0, "renders": 5}
    blurred = vae_round_trip(_PoolingAutoencoder(4), n=5)
    assert blurred["eye_error"] > 40 and blurred["eye_error"] > 4 * blurred["image_error"]


def test_pretraining_runs_end_to_end_on_the_cpu(tmp_path):
    """A few steps of every phase: the command writes a loadable pipeline, a judge and the record."""
    from diffusers import StableDiffusionPipeline

    from flatlora_diffusion.toyworld.judge import judge_images, load_judge
    from flatlora_diffusion.toyworld.pretrain import main

    tiny = ["images=64", "vae_steps=2", "vae_batch=4", "unet_steps=2", "unet_batch=4", "unet_warmup=1",
            "judge_images=32", "judge_steps=2", "judge_batch=4", "workers=1", "class_variety=0.3",
            'architecture={"vae_channels": [16, 16], "unet_channels": [32, 32], "text_hidden": 32, "text_layers": 1}']
    assert main(["--out", str(tmp_path), "--device", "cpu", "--set", *tiny]) == 0
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["steps_done"] == {"vae": 2, "unet": 2, "judge": 2}
    assert set(record["sha256"]) == {"judge/judge.safetensors", "model/text_encoder/model.safetensors",
                                     "model/unet/diffusion_pytorch_model.safetensors",
                                     "model/vae/diffusion_pytorch_model.safetensors"}
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    image = pipe("a photo of a red circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert len(judge_images([image], load_judge(tmp_path / "judge"))) == 1

    # The stage that trains the VAE again (8 latent channels, variety pictures, the edge loss) rewrites only
    # the VAE and records how well it keeps a toy's eyes.
    vae_file = tmp_path / "model/vae/diffusion_pytorch_model.safetensors"
    unet_file = tmp_path / "model/unet/diffusion_pytorch_model.safetensors"
    vae_before, unet_before = vae_file.read_bytes(), unet_file.read_bytes()
    eight = tiny[-1][:-1] + ', "latent_channels": 8}'
    assert main(["--out", str(tmp_path), "--retrain-vae", "--device", "cpu", "--set", *tiny[:-1], eight,
                 "vae_variety=0.25", "vae_edge_weight=1.0"]) == 0
    assert vae_file.read_bytes() != vae_before and unet_file.read_bytes() == unet_before
    stage = json.loads((tmp_path / "pretrain.json").read_text())["stages"][-1]
    assert stage["command"].endswith("--retrain-vae") and stage["steps_done"] == 2
    assert stage["round_trip"]["eye_error"] > 0 and stage["config"]["vae_edge_weight"] == 1.0

    # The later stage that trains the UNet and text encoder again (on the new VAE's 8 channels, with
    # top-level attention) keeps the VAE and judge bytes, rewrites the other two and records itself.
    before = {f: f.read_bytes() for f in (vae_file, unet_file, tmp_path / "judge/judge.safetensors")}
    top_attention = eight[:-1] + ', "unet_top_attention": true}'
    assert main(["--out", str(tmp_path), "--retrain-unet", "--device", "cpu", "--set", *tiny[:-1], top_attention]) == 0
    assert vae_file.read_bytes() == before[vae_file]
    assert (tmp_path / "judge/judge.safetensors").read_bytes() == before[tmp_path / "judge/judge.safetensors"]
    assert unet_file.read_bytes() != before[unet_file]
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["stages"][-1]["command"].endswith("--retrain-unet") and record["stages"][-1]["steps_done"] == 2
    assert record["sha256"]["model/unet/diffusion_pytorch_model.safetensors"] == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    assert pipe.unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 8
    image = pipe("a photo of a toy", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    # The stage that trains the UNet and text encoder further (on another class_variety) starts from the folder's
    # own weights: at learning rate 0 they come back byte for byte (a new UNet would not), and it records itself.
    before = unet_file.read_bytes()
    assert main(["--out", str(tmp_path), "--finetune-unet", "--device", "cpu", "--set", *tiny[:-1], top_attention,
                 "unet_lr=0", "class_variety=0.5"]) == 0
    assert unet_file.read_bytes() == before
    stage = json.loads((tmp_path / "pretrain.json").read_text())["stages"][-1]
    assert stage["command"].endswith("--finetune-unet") and stage["config"]["class_variety"] == 0.5


def test_pretraining_refuses_unknown_settings(tmp_path, capsys):
    from flatlora_diffusion.toyworld.pretrain import main

    assert main(["--out", str(tmp_path / "w"), "--set", "unet_stepz=3"]) == 2
    assert "unet_stepz" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_instance_class_and_heldout_folders(tmp_path):
    from PIL import Image

    from flatlora_diffusion.toyworld.data import (write_class_images, write_heldout_subject_images,
                                                  write_instance_images)
    from flatlora_diffusion.toyworld.judge import judge_images

    inst = write_instance_images(tmp_path / "i", 5)
    held = write_heldout_subject_images(tmp_path / "h", 4)
    cls = write_class_images(tmp_path / "c", 6)
    assert [p.read_bytes() for p in inst] == [p.read_bytes() for p in write_instance_images(tmp_path / "i2", 5)]
    assert not set(p.read_bytes() for p in inst) & set(p.read_bytes() for p in held)
    verdicts = judge_images([Image.open(p) for p in inst + held + cls])
    assert all(v.subject and v.scene == "plain" for v in verdicts[:9])
    assert not any(v.subject for v in verdicts[9:]) and all(v.shape == "toy" for v in verdicts[9:])
    assert judge_dir().is_dir()


def test_the_task_draws_its_class_pictures_as_the_world_learnt_the_class(tmp_path):
    """recipe.has_class_variety reads the world's pretrain.json: the first pretraining's class_variety, replaced
    by the last --retrain-unet's or --finetune-unet's (a --retrain-vae's does not count: the VAE is no prior), and
    write_task_data then writes class pictures of the class's own variety; the shipped world's are the
    vocabulary's plain toys."""
    from flatlora_diffusion.toyworld.data import write_class_images
    from flatlora_diffusion.toyworld.recipe import CLASS_IMAGES, has_class_variety, write_task_data

    world = tmp_path / "world"
    (world / "model").mkdir(parents=True)
    record = {"config": {"seed": 0}, "stages": [
        {"command": "python -m flatlora_diffusion.toyworld.pretrain --retrain-vae", "config": {"class_variety": 0.2}}]}
    (world / "pretrain.json").write_text(json.dumps(record))
    assert not has_class_variety(str(world / "model"))
    record["stages"].append({"command": "python -m flatlora_diffusion.toyworld.pretrain --retrain-unet",
                             "config": {"class_variety": 0.2}})
    (world / "pretrain.json").write_text(json.dumps(record))
    assert has_class_variety(str(world / "model"))
    assert not has_class_variety(MODEL_NAME)
    record["stages"].append({"command": "python -m flatlora_diffusion.toyworld.pretrain --finetune-unet",
                             "config": {"class_variety": 0.0}})
    (world / "pretrain.json").write_text(json.dumps(record))
    assert not has_class_variety(str(world / "model"))  # the last stage that trained the UNet decides
    record["stages"][-1]["config"]["class_variety"] = 0.2
    (world / "pretrain.json").write_text(json.dumps(record))
    assert has_class_variety(str(world / "model"))

    _, varied = write_task_data(tmp_path / "a", model=str(world / "model"))
    _, plain = write_task_data(tmp_path / "b")
    read = lambda folder: sorted(p.read_bytes() for p in folder.iterdir())  # noqa: E731
    assert read(varied) == sorted(p.read_bytes() for p in write_class_images(tmp_path / "v", CLASS_IMAGES, varied=True))
    assert read(plain) == sorted(p.read_bytes() for p in write_class_images(tmp_path / "p", CLASS_IMAGES))
    assert read(varied) != read(plain)


def test_a_recipe_trial_trains_with_the_changed_settings(tmp_path, capsys):
    """measure --dreambooth --recipe KEY=VALUE: both runs train with the changed settings (here 1 step at another
    learning rate), the rest of the recipe stays, and the result records the change; an unknown setting is one
    line and exit 2 before anything is written."""
    import yaml

    from flatlora_diffusion.toyworld.measure import main

    out = tmp_path / "out.json"
    assert main(["--dreambooth", str(tmp_path / "db"), "--per-split", "1", "--device", "cpu", "--output", str(out),
                 "--recipe", "max_train_steps=1", "learning_rate=0.002"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["recipe_changes"] == {"max_train_steps": "1", "learning_rate": "0.002"}
    assert {"base model", "LoRA", "Flat-LoRA sigma=0.1"} <= set(result)
    for run in ("lora", "flat-lora"):
        config = yaml.safe_load((tmp_path / "db" / run / "config.yaml").read_text())
        assert config["max_train_steps"] == 1 and config["learning_rate"] == 0.002
        assert config["rank"] == 4 and config["with_prior_preservation"]  # the recipe's own settings

    assert main(["--dreambooth", str(tmp_path / "db2"), "--recipe", "learnig_rate=1"]) == 2
    assert "unknown setting 'learnig_rate'; did you mean 'learning_rate'?" in capsys.readouterr().err
    assert not (tmp_path / "db2").exists()
