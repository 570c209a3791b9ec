"""`flatlora-diffusion evaluate`: the sharpness estimator against a known answer, exactness (weights untouched,
bit-reproducible numbers, common random numbers across runs), eval.json and the table on real tiny runs,
held-out loss and gap, image scores through the plug-in interface and with tiny offline CLIP / DINO models,
and bad input (one line, exit 2, before any model loads, nothing written)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from flatlora_diffusion import cli
from flatlora_diffusion.evaluation import evaluate as evaluate_mod
from flatlora_diffusion.evaluation import images as images_mod
from flatlora_diffusion.evaluation.evaluate import EvalOptions, evaluate
from flatlora_diffusion.evaluation.runs import inspect_run, load_base, lora_attached
from flatlora_diffusion.evaluation.sharpness import lora_layers, perturbed, plain_layers, sharpness_curve
from flatlora_diffusion.tiny import make_subject_images
from tests.training_helpers import run as train_run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--draws", "3", "--rhos", "0.02", "0.1", "--triples", "6"]


# --- the estimator, without diffusers ------------------------------------------------------------------------
def _lora_linear(seed=0):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 6, bias=False))
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), model)
    with torch.no_grad():
        model[0].base_layer.weight[0] *= 10  # one row far larger: only a filter-wise law gets the answer right
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


@pytest.mark.parametrize("kind", ["lora", "plain"])
def test_known_answer_of_a_quadratic_loss(kind):
    """L(W) = sum_i c_i ((W - W*) x)_i^2 at W* = W': the increase under eps is sum_i c_i (eps_i x)^2, whose
    expectation under the filter-wise law is rho^2 ||x||^2 sum_i c_i ||W'_i||^2 / n."""
    model = _lora_linear() if kind == "lora" else nn.Sequential(nn.Linear(12, 6, bias=False)).requires_grad_(False)
    if kind == "plain":
        model[0].weight[0] *= 10
    layers = lora_layers([model]) if kind == "lora" else plain_layers([model])
    assert len(layers) == 1
    w_merged = layers[0].merged_weight()
    if kind == "lora":  # W' = W + s B A, not W
        assert not torch.allclose(w_merged, model[0].base_layer.weight)
    x = torch.randn(12, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    target = (w_merged @ x).double()

    def loss():
        return float((c.double() * (model(x[None])[0].double() - target) ** 2).sum())

    rho, n = 0.05, 12
    expected = rho ** 2 * float(x @ x) * float((c * (w_merged ** 2).sum(1)).sum()) / n
    # a layer-wise law (one std for the whole matrix, the same total variance) gives a clearly different answer
    layerwise = rho ** 2 * float(x @ x) * float(c.sum()) * float((w_merged ** 2).sum()) / (6 * n)
    assert abs(layerwise - expected) > 0.3 * expected
    curve = sharpness_curve(loss, layers, [rho, 2 * rho], draws=1500, seed=3, antithetic=False)
    p1, p2 = curve.points
    assert curve.clean_loss < 1e-9
    assert abs(p1.mean_increase - expected) < 4 * p1.stderr, (p1.mean_increase, expected, p1.stderr)
    assert p1.stderr < 0.1 * expected  # the check has teeth
    # common random numbers across rho: the same standard normals, scaled, so the quadratic loss scales by 4
    assert all(math.isclose(b, 4 * a, rel_tol=1e-3, abs_tol=1e-3 * expected)
               for a, b in zip(p1.increases, p2.increases))
    assert p1.worst_increase == max(p1.increases) >= p1.mean_increase


def test_antithetic_pairs_cancel_the_first_order_term():
    """Away from the minimum (W* != W') the increase is 2 r.(eps x) + (eps x)^2: the linear term has mean zero
    but large variance. The pair (+eps, -eps) removes it exactly; the expectation is unchanged."""
    model = _lora_linear()
    layers = lora_layers([model])
    w_merged = layers[0].merged_weight()
    x = torch.randn(12, generator=torch.Generator().manual_seed(1))
    target = (w_merged @ x).double() + 1.0  # residual r = -1 in every row

    def loss():
        return float(((model(x[None])[0].double() - target) ** 2).sum())

    rho, n = 0.05, 12
    expected = rho ** 2 * float(x @ x) * float((w_merged ** 2).sum()) / n
    single = sharpness_curve(loss, layers, [rho], draws=200, seed=3, antithetic=False).points[0]
    paired = sharpness_curve(loss, layers, [rho], draws=200, seed=3).points[0]
    assert paired.stderr < 0.2 * single.stderr
    assert abs(paired.mean_increase - expected) < 4 * paired.stderr and paired.stderr < 0.1 * expected
    assert abs(single.mean_increase - expected) < 4 * single.stderr
    # the worst single evaluation of a pair is at least the pair's mean
    assert paired.worst_increase >= max(paired.increases)


def test_perturbation_leaves_weights_bitwise_and_is_seeded():
    model = _lora_linear()
    layers = lora_layers([model])
    x = torch.randn(4, 12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clean = model(x)
    with perturbed(layers, 0.1, seed=0, draw=0):
        noisy = model(x)
    with perturbed(layers, 0.1, seed=0, draw=0):
        assert torch.equal(model(x), noisy)  # a draw is a function of (seed, draw, layer)
    with perturbed(layers, 0.1, seed=0, draw=1):
        assert not torch.allclose(model(x), noisy)
    with perturbed(layers, 0.1, seed=0, draw=0, mirrored=True):  # exactly -eps: (y+ - y0) == -(y- - y0)
        assert torch.allclose(model(x) - clean, clean - noisy, atol=1e-6)
    with pytest.raises(RuntimeError):
        with perturbed(layers, 0.1, seed=0, draw=2):
            raise RuntimeError("a failing loss")
    assert not torch.allclose(noisy, clean)
    assert torch.equal(model(x), clean)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert "forward" not in model[0].base_layer.__dict__  # the patched forward is gone


# --- real tiny runs --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Plain LoRA and Flat-LoRA, same seed, 4 steps at 64 px, one validation image each; and held-out images."""
    base = tmp_path_factory.mktemp("eval")
    common = dict(max_train_steps=4, learning_rate=1e-2, validation_prompt=["a photo of sks toy"],
                  validation_seeds=[0], validation_inference_steps=2)
    lora = train_run(tiny, base / "lora", flat_sigma=0.0, **common).path
    flat = train_run(tiny, base / "flat", flat_sigma=0.1, **common).path
    heldout = Path(make_subject_images(base / "heldout", n=2, size=80, seed=5)[0]).parent
    return {"lora": lora, "flat": flat, "heldout": heldout, "base": base}


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval.json"))
    return dst


def _numbers(record):
    return {k: record[k] for k in ("loss", "sharpness", "image_scores", "settings")}


def test_evaluate_writes_eval_json_and_prints_the_comparison(runs, tmp_path, capsys):
    out = tmp_path / "all.json"
    code = cli.main(["evaluate", str(runs["lora"]), str(runs["flat"]), "--eval_data_dir", str(runs["heldout"]),
                     "--output", str(out), *FAST])
    printed = capsys.readouterr().out
    assert code == 0
    records = [json.loads((runs[n] / "eval.json").read_text()) for n in ("lora", "flat")]
    for rec, sigma in zip(records, (0.0, 0.1)):
        assert rec["schema"] == "flatlora-diffusion/eval/1" and rec["flat_sigma"] == sigma and rec["arch"] == "sd15"
        loss = rec["loss"]
        assert loss["heldout"] is not None and loss["gap"] == pytest.approx(loss["heldout"] - loss["instance"])
        assert loss["heldout"] != loss["instance"]  # two different image sets
        sharp = rec["sharpness"]
        assert sharp["split"] == "heldout" and sharp["clean_loss"] == loss["heldout"]
        assert sharp["layers"] == 48  # to_q/k/v/out of attn1 and attn2 in the tiny UNet's 6 transformer blocks
        assert [p["rho"] for p in sharp["points"]] == [0.02, 0.1]
        for p in sharp["points"]:
            assert len(p["increases"]) == 3 and p["stderr"] > 0
            assert p["mean_loss"] == pytest.approx(sharp["clean_loss"] + p["mean_increase"])
            assert p["worst_increase"] >= max(p["increases"])  # a single evaluation vs pair means
        assert rec["settings"]["images"] == {"instance": 3, "heldout": 2} and rec["image_scores"] == {}
    # training moved the two runs apart; the losses of the two image sets differ
    assert records[0]["loss"]["instance"] != records[1]["loss"]["instance"]
    combined = json.loads(out.read_text())
    assert [r["name"] for r in combined["runs"]] == ["lora", "flat"]
    comp = combined["comparisons"][0]
    assert comp["paired"] and comp["run"] == "flat" and comp["reference"] == "lora"
    for d, pa, pb in zip(comp["sharpness_difference"], *(r["sharpness"]["points"] for r in records)):
        diffs = [b - a for a, b in zip(pa["increases"], pb["increases"])]
        assert d["mean"] == pytest.approx(sum(diffs) / 3)
    lines = printed.strip().splitlines()
    assert lines[1].split()[:5] == ["run", "sigma", "instance", "held-out", "gap"]
    assert lines[2].startswith("lora") and lines[3].startswith("flat")
    assert "Δ@ρ=0.02" in lines[1] and "flat − lora (paired by draw)" in lines[4]


def test_numbers_are_bit_reproducible_and_draws_are_common_to_runs(runs, tmp_path):
    """The same run evaluated twice (and a copy of it beside it) gives identical numbers; the paired
    difference between a run and its copy is exactly zero draw by draw, which only holds when every run sees
    the same triples and the same noise draws."""
    twin = _copy_run(runs["lora"], tmp_path / "twin")
    opts = EvalOptions(draws=3, rhos=(0.02, 0.1), triples=6)
    first = evaluate([str(runs["lora"]), str(twin)], opts, str(tmp_path / "a.json"))
    again = evaluate([str(runs["lora"])], opts)
    assert _numbers(first[0]) == _numbers(first[1]) == _numbers(again[0])
    comp = json.loads((tmp_path / "a.json").read_text())["comparisons"][0]
    assert comp["paired"] and all(d["mean"] == 0.0 and d["stderr"] == 0.0 for d in comp["sharpness_difference"])
    assert first[0]["loss"]["heldout"] is None and first[0]["loss"]["gap"] is None  # no held-out set given
    other_seed = evaluate([str(runs["lora"])], EvalOptions(draws=3, rhos=(0.02, 0.1), triples=6, eval_seed=1))
    assert other_seed[0]["loss"]["instance"] != first[0]["loss"]["instance"]


def test_lora_is_loaded_for_the_block_and_the_base_restored_bitwise(runs):
    run = inspect_run(runs["flat"])
    components = load_base(run, "cpu")
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    with lora_attached(components, run):
        layers = lora_layers([components.unet, *components.text_encoders])
        assert len(layers) == 48
        assert any(layer.merged_weight().ne(layer.base.weight).any() for layer in layers)  # a trained delta
    after = components.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not lora_layers([components.unet])


def test_sdxl_run_with_text_encoder_lora_is_perturbed_everywhere(tiny, tmp_path):
    out = train_run(tiny, tmp_path / "xl", arch="sdxl", max_train_steps=2, train_text_encoder=True).path
    twin = _copy_run(out, tmp_path / "xl_twin")
    record, again = evaluate([str(out), str(twin)], EvalOptions(draws=2, rhos=(0.1,), triples=4))
    assert record["arch"] == "sdxl" and math.isfinite(record["loss"]["instance"])
    assert _numbers(record) == _numbers(again)  # the first run's LoRA (all three models) was fully unloaded
    # every LoRA layer of the file is perturbed: the UNet's and both text encoders'
    keys = [k for k in load_file(out / "pytorch_lora_weights.safetensors") if k.endswith("lora_A.weight")]
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert record["sharpness"]["layers"] == len(keys)
    assert record["sharpness"]["points"][0]["increases"][0] != 0.0


def test_the_heldout_hook_supplies_heldout_images(runs, monkeypatch):
    """What a toy-world run will do: heldout_images_for(run) names unseen images of its subject."""
    from flatlora_diffusion.evaluation import heldout

    monkeypatch.setattr(heldout, "heldout_images_for", lambda run: runs["heldout"])
    (record,) = evaluate([str(runs["lora"])], EvalOptions(draws=1, rhos=(0.1,), triples=2))
    assert record["settings"]["images"]["heldout"] == 2 and record["sharpness"]["split"] == "heldout"
    assert record["loss"]["gap"] == pytest.approx(record["loss"]["heldout"] - record["loss"]["instance"])


# --- image scores ------------------------------------------------------------------------------------------------
class _Recorder:
    """A scorer through the plug-in interface: what a toy-world judge would be."""

    names = ("count",)

    def __init__(self):
        self.seen = None

    def score(self, prompts, images, references):
        self.seen = (prompts, images, references)
        return {"count": float(sum(len(i) for i in images))}


def test_image_scores_plug_in_gets_the_runs_own_images(runs, monkeypatch):
    """The images handed to scorers are the run's LoRA images: they reproduce the validation image training made."""
    recorder = _Recorder()
    monkeypatch.setattr(evaluate_mod, "load_scorers", lambda *a: [recorder])
    (record,) = evaluate([str(runs["flat"])], EvalOptions(samples=1, seeds=[0], draws=1, rhos=(0.1,), triples=2))
    assert record["image_scores"] == {"count": 1.0}
    prompts, images, references = recorder.seen
    assert prompts == ["a photo of sks toy"] and len(references) == 3
    made = np.asarray(images[0][0], dtype=np.float32)
    trained = np.asarray(Image.open(runs["flat"] / "samples" / "step_000004" / "0_0.png"), dtype=np.float32)
    base = np.asarray(Image.open(runs["flat"] / "samples" / "step_000000" / "0_0.png"), dtype=np.float32)
    assert np.abs(made - trained).max() <= 2 and np.abs(made - base).mean() > 2


def test_no_scorer_means_no_generation(runs):
    def refuse(prompts, seeds):
        raise AssertionError("generated without a scorer")

    assert images_mod.image_scores(runs["lora"], 2, [0, 1], generate=refuse) == {}


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory):
    """A tiny random CLIPModel with the project's offline tokenizer, and a tiny Dinov2Model, with processors."""
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config,
                              Dinov2Model)

    from flatlora_diffusion.tiny import build_clip_tokenizer

    base = tmp_path_factory.mktemp("vision")
    clip_dir, dino_dir = base / "clip", base / "dino"
    tok = build_clip_tokenizer(clip_dir)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip_dir)
    crop = {"height": 32, "width": 32}
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop).save_pretrained(clip_dir)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             image_size=32, patch_size=8)).save_pretrained(dino_dir)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size=crop).save_pretrained(dino_dir)
    return {"clip": clip_dir, "dino": dino_dir}


def test_clip_and_dino_scores_with_tiny_offline_models(runs, vision_models, tmp_path, capsys):
    from transformers import CLIPModel, CLIPTokenizer

    scorers = images_mod.load_scorers(str(vision_models["clip"]), str(vision_models["dino"]))
    refs = [Image.open(p).convert("RGB") for p in sorted(runs["heldout"].glob("*.png"))]
    other = Image.new("RGB", (64, 64), (250, 20, 20))
    clip, dino = scorers
    same = {**clip.score(["a photo of sks toy"], [[refs[0]]], [refs[0]]), **dino.score([], [[refs[0]]], [refs[0]])}
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5) and same["dino"] == pytest.approx(1.0, abs=1e-5)
    differ = dino.score([], [[other]], [refs[0]])
    assert differ["dino"] < 0.999
    # CLIP-T is CLIP's own text-image cosine (the library's public feature functions as the reference)
    model, tok = CLIPModel.from_pretrained(vision_models["clip"]), CLIPTokenizer.from_pretrained(vision_models["clip"])
    with torch.no_grad():
        t = model.get_text_features(**tok(["a red toy"], return_tensors="pt"))
        i = model.get_image_features(pixel_values=clip._pixels([other]))
    t, i = (getattr(v, "pooler_output", v) for v in (t, i))
    expected = float(torch.nn.functional.cosine_similarity(t, i))
    assert clip.score(["a red toy"], [[other]], [other])["clip_t"] == pytest.approx(expected, abs=1e-5)

    work = _copy_run(runs["lora"], tmp_path / "lora")
    code = cli.main(["evaluate", str(work), "--clip_model", str(vision_models["clip"]), "--dino_model",
                     str(vision_models["dino"]), "--samples", "2", "--draws", "1", "--rhos", "0.1", "--triples", "2"])
    assert code == 0
    scores = json.loads((work / "eval.json").read_text())["image_scores"]
    assert set(scores) == {"clip_t", "clip_i", "dino"} and all(-1 <= v <= 1 for v in scores.values())
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header[-3:] == ["clip_i", "clip_t", "dino"]


# --- bad input ---------------------------------------------------------------------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(evaluate_mod, "load_base", refuse)


def _tree(root: Path):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def _bad_case(case, runs, tiny, tmp: Path):
    good = _copy_run(runs["lora"], tmp / "good")
    if case == "not_a_folder":
        return [str(tmp / "nowhere")], "is not a folder"
    if case == "not_a_run":
        (tmp / "plain").mkdir()
        return [str(tmp / "plain")], "is not a run folder"
    if case == "no_lora":
        bare = _copy_run(runs["lora"], tmp / "bare")
        (bare / "pytorch_lora_weights.safetensors").unlink()
        return [str(good), str(bare)], "has no LoRA file"
    if case in ("other_arch", "other_base"):
        other = _copy_run(runs["flat"], tmp / "other")
        cfg = yaml.safe_load((other / "config.yaml").read_text())
        if case == "other_arch":
            cfg["pretrained_model_name_or_path"] = str(tiny["sdxl"])
        else:
            cfg["pretrained_model_name_or_path"] = str(shutil.copytree(tiny["sd15"], tmp / "sd15_copy"))
        (other / "config.yaml").write_text(yaml.safe_dump(cfg))
        return [str(good), str(other)], "different architectures" if case == "other_arch" else "different base models"
    if case == "missing_clip":
        return [str(good), "--clip_model", str(tmp / "no_clip")], "--clip_model"
    if case == "broken_clip":
        (tmp / "broken").mkdir()
        (tmp / "broken" / "config.json").write_text("{}")
        return [str(good), "--clip_model", str(tmp / "broken")], "cannot be loaded as a CLIP model"
    if case == "missing_heldout":
        return [str(good), "--eval_data_dir", str(tmp / "none")], "does not exist"
    if case == "bad_output":
        return [str(good), "--output", str(tmp / "no" / "dir" / "x.json")], "--output"
    if case == "seeds_mismatch":
        return [str(good), "--samples", "3", "--seeds", "0", "1"], "--seeds"
    rhos = {"rhos_text": ["0.1", "abc"], "rhos_negative": ["-0.1"], "rhos_nan": ["nan"], "rhos_zero": ["0,0.1"]}
    return [str(good), "--rhos", *rhos[case]], "--rhos"


@pytest.mark.parametrize("case", ["not_a_folder", "not_a_run", "no_lora", "other_arch", "other_base", "missing_clip",
                                  "broken_clip", "missing_heldout", "bad_output", "rhos_text", "rhos_negative",
                                  "rhos_nan", "rhos_zero", "seeds_mismatch"])
def test_bad_input_one_line_exit_2_nothing_written(case, runs, tiny, tmp_path, capsys, no_model_loading):
    argv, fragment = _bad_case(case, runs, tiny, tmp_path)
    before = _tree(tmp_path)
    code = cli.main(["evaluate", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert _tree(tmp_path) == before  # no eval.json, nothing else touched
    assert not list(tmp_path.rglob("eval.json"))


def test_bad_input_from_the_real_command_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flatlora_diffusion.cli", "evaluate", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path} is not a run folder: it has no config.yaml"]
