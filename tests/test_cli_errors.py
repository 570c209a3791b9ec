"""Bad input: one clear line on stderr, exit code 2, before any model loads, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlora_diffusion import cli, models
from flatlora_diffusion.tiny import make_subject_images, make_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    images = base / "images"
    make_subject_images(images, n=2, size=64)
    return {"model": make_tiny_pipeline(base / "sd15", "sd15"), "images": images, "base": base}


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(models, "load_components", refuse)


def _snapshot(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _good(tiny, out):
    return ["--pretrained_model_name_or_path", str(tiny["model"]), "--instance_data_dir", str(tiny["images"]),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--resolution", "64"]


def _expect_error(capsys, tiny, argv, fragment, watch: Path):
    before = _snapshot(watch)
    code = cli.main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert fragment in err[0], err[0]
    assert "Traceback" not in err[0]
    assert _snapshot(watch) == before  # nothing written


def _replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.mark.parametrize(
    "case",
    ["missing_dir", "empty_dir", "no_readable", "unknown_model", "unknown_hub_id", "not_a_pipeline",
     "resolution", "rank", "sigma", "prior_no_prompt", "unknown_flag", "output_is_file", "output_unwritable",
     "cuda_graph_without_gpu", "low_memory_text_encoder", "low_memory_fp16", "push_offline", "push_no_token", "push_bad_repo_id", "push_token_refused"],
)
def test_bad_input_gives_one_line_and_writes_nothing(tiny, tmp_path, capsys, case, monkeypatch):
    out = tmp_path / "out"
    argv = _good(tiny, out)
    empty = tmp_path / "empty"
    empty.mkdir()
    if case == "missing_dir":
        argv, frag = _replace(argv, "--instance_data_dir", str(tmp_path / "nope")), "nope"
    elif case == "empty_dir":
        argv, frag = _replace(argv, "--instance_data_dir", str(empty)), "empty"
    elif case == "no_readable":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "a.png").write_bytes(b"not an image")
        argv, frag = _replace(argv, "--instance_data_dir", str(bad)), "could be read"
    elif case == "unknown_model":
        argv, frag = _replace(argv, "--pretrained_model_name_or_path", str(tmp_path / "no_model")), "not found"
    elif case == "unknown_hub_id":
        argv, frag = _replace(argv, "--pretrained_model_name_or_path", "nobody/no-such-model-xyz"), "unknown model"
    elif case == "not_a_pipeline":
        argv, frag = _replace(argv, "--pretrained_model_name_or_path", str(empty)), "model_index.json"
    elif case == "resolution":
        argv, frag = _replace(argv, "--resolution", "100"), "multiple of 8"
    elif case == "rank":
        argv, frag = argv + ["--rank", "0"], "--rank"
    elif case == "sigma":
        argv, frag = argv + ["--flat_sigma", "-0.1"], "--flat_sigma"
    elif case == "prior_no_prompt":
        argv, frag = argv + ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "cls")], "--class_prompt"
    elif case == "unknown_flag":
        argv, frag = argv + ["--rnak", "4"], "did you mean --rank"
    elif case == "cuda_graph_without_gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU: --cuda_graph on is valid here")
        argv, frag = argv + ["--cuda_graph", "on"], "needs a CUDA GPU"
    elif case == "low_memory_text_encoder":
        argv, frag = argv + ["--low_memory", "--train_text_encoder"], "--low_memory cannot be combined with --train_text_encoder"
    elif case == "low_memory_fp16":
        argv, frag = argv + ["--mixed_precision", "fp16", "--low_memory"], "--low_memory cannot be combined with --mixed_precision fp16"
    elif case.startswith("push_"):
        import huggingface_hub

        argv = argv + ["--push_to_hub"]
        if case == "push_offline":  # the test environment is offline (HF_HUB_OFFLINE=1)
            frag = "HF_HUB_OFFLINE is set"
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", "0")
            monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
            monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
        if case == "push_no_token":
            frag = "needs a Hugging Face token"
        elif case == "push_bad_repo_id":
            argv, frag = argv + ["--hub_model_id", "me/not a name!"], "not a hub repository name"
        elif case == "push_token_refused":
            def refuse(self, token=None, **kwargs):
                raise RuntimeError("401 Client Error: Unauthorized\nmore detail")

            monkeypatch.setattr(huggingface_hub.HfApi, "whoami", refuse)
            argv, frag = argv + ["--hub_token", "hf_revoked"], "did not accept the token (401 Client Error"
    elif case == "output_is_file":
        f = tmp_path / "file"
        f.write_text("x")
        argv, frag = _replace(argv, "--output_dir", str(f / "run")), "not a folder"
    else:  # /proc refuses new files even for root, unlike a chmod-ed folder
        argv, frag = _replace(argv, "--output_dir", "/proc/flatlora-out/run"), "not writable"
    _expect_error(capsys, tiny, argv, frag, tmp_path)


def test_unknown_config_key_names_the_closest(tiny, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"pretrained_model_name_or_path: {tiny['model']}\nlearning_rat: 1e-4\n")
    _expect_error(capsys, tiny, ["--config", str(cfg)], "'learning_rat'", tmp_path)
    cfg.write_text("rank: [1, 2]\n")
    _expect_error(capsys, tiny, ["--config", str(cfg)], "rank", tmp_path)


def test_flags_override_the_config_file(tiny, tmp_path):
    from flatlora_diffusion.config import config_from_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"pretrained_model_name_or_path: {tiny['model']}\ninstance_data_dir: {tiny['images']}\nrank: 8\n"
                   "validation_prompt: one prompt\n")
    c = config_from_args(["--config", str(cfg), "--rank", "16"])
    assert c.rank == 16 and c.validation_prompt == ["one prompt"] and c.instance_data_dir == str(tiny["images"])


def test_no_traceback_in_a_real_process(tiny, tmp_path):
    result = subprocess.run(
        [sys.executable, "train_dreambooth_flat.py", *_good(tiny, tmp_path / "out"), "--rank", "-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --rank must be a positive integer, got -1"
    assert not (tmp_path / "out").exists()


def test_make_tiny_model_command_writes_a_loadable_pipeline(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    assert cli.main(["make-tiny-model", str(tmp_path / "xl"), "--arch", "sdxl"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "xl")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "xl")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert models.inspect_model_source(str(tmp_path / "xl")).arch == "sdxl"


def test_unknown_command_names_the_closest(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown command 'trian'; did you mean 'train'?")


def test_demo_refuses_a_file_as_its_output_folder_in_one_line(tmp_path):
    """Checked before anything starts (no fork server, no torch): one line, exit 2, the file untouched."""
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    result = subprocess.run([sys.executable, "-m", "flatlora_diffusion.cli", "demo", "--output", str(target)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --output {target} is a file; give a folder for the demo's runs (made if missing)"
    assert target.read_text() == "mine"
