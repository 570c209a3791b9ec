"""sample.py: loading pipelines, seeded generation with a LoRA that leaves the pipeline clean, grids."""

import numpy as np
import pytest
import torch
from PIL import Image

from flatlora_diffusion import sample, tiny
from flatlora_diffusion.export import kohya_state_dict, diffusers_state_dict

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {arch: tiny.make_tiny_pipeline(root / arch, arch=arch) for arch in tiny.ARCHES}


def _arr(image):
    return np.asarray(image, dtype=np.int16)


def _lora_files(pipe, folder, arch):
    """A random, clearly non-zero UNet LoRA written in both formats; the pipeline is left clean."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    kohya = kohya_state_dict({"unet": pipe.unet}, arch=arch)
    state, meta = diffusers_state_dict({"unet": pipe.unet})
    pipe.unet.delete_adapters("default")
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(folder / "k.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "d.safetensors"), metadata=meta)
    return folder / "k.safetensors", folder / "d.safetensors"


@pytest.mark.parametrize("arch", tiny.ARCHES)
def test_generate_is_seeded_applies_lora_and_leaves_pipeline_clean(pipeline_dirs, tmp_path, arch):
    pipe = sample.load_pipeline(str(pipeline_dirs[arch]))
    kw = dict(steps=2, guidance_scale=3.0)
    base = sample.generate(pipe, [PROMPT, "a photo of a cat"], [0, 1], **kw)
    assert len(base) == 4 and all(im.size == (64, 64) for im in base)
    # an image depends on its own seed only, not on its neighbours in the call
    again = sample.generate(pipe, ["a photo of a cat"], [1], **kw)
    assert np.array_equal(_arr(again[0]), _arr(base[3]))
    assert not np.array_equal(_arr(base[0]), _arr(base[1]))

    kohya_file, diffusers_file = _lora_files(pipe, tmp_path, arch)
    with_kohya = sample.generate(pipe, [PROMPT], [0], lora_path=kohya_file, **kw)
    with_diffusers = sample.generate(pipe, [PROMPT], [0], lora_path=diffusers_file, **kw)
    half = sample.generate(pipe, [PROMPT], [0], lora_path=kohya_file, lora_scale=0.5, **kw)
    zero = sample.generate(pipe, [PROMPT], [0], lora_path=kohya_file, lora_scale=0.0, **kw)
    assert np.abs(_arr(with_kohya[0]) - _arr(base[0])).mean() > 1.0
    assert np.abs(_arr(with_kohya[0]) - _arr(with_diffusers[0])).max() <= 2  # fp16 kohya file vs fp32
    assert not np.array_equal(_arr(half[0]), _arr(with_kohya[0]))
    assert np.abs(_arr(zero[0]) - _arr(base[0])).max() <= 1
    # the LoRA is gone again: no peft layers left and the same image as before
    assert not any("lora_" in n for n, _ in pipe.unet.named_parameters())
    after = sample.generate(pipe, [PROMPT], [0], **kw)
    assert np.array_equal(_arr(after[0]), _arr(base[0]))


def test_single_file_model_loads(pipeline_dirs, tmp_path):
    folder = pipeline_dirs["sdxl"]
    single = tiny.save_single_file_checkpoint(folder, tmp_path / "model.safetensors")
    pipe = sample.load_pipeline(str(single), config=str(folder))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    ref = sample.load_pipeline(str(folder))
    a = sample.generate(pipe, [PROMPT], [5], steps=1)
    b = sample.generate(ref, [PROMPT], [5], steps=1)
    assert np.array_equal(_arr(a[0]), _arr(b[0]))


def test_bad_inputs_are_one_line_errors(pipeline_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(sample.SampleError, match="model_index.json"):
        sample.load_pipeline(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(sample.SampleError, match="safetensors"):
        sample.load_pipeline(str(tmp_path / "notes.txt"))
    pipe = sample.load_pipeline(str(pipeline_dirs["sd15"]))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(sample.SampleError):
        sample.generate(pipe, [PROMPT], [0], lora_path=bad, steps=1)
    with pytest.raises(sample.SampleError):
        sample.generate(pipe, [], [0], steps=1)
    assert not any("lora_" in n for n, _ in pipe.unet.named_parameters())


def test_comparison_grid_layout():
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    blue = Image.new("RGB", (40, 40), (0, 0, 255))
    wide = Image.new("RGB", (60, 30), (0, 255, 0))
    grid = sample.comparison_grid(
        [("LoRA", [red, red, None]), ("Flat-LoRA (sigma 0.1) with a very long label", [blue, wide])],
        row_labels=["a photo of sks dog / seed 0", "seed 1", "seed 2"],
    )
    assert grid.mode == "RGB"
    px = np.asarray(grid)
    # every cell is as large as the largest image (64 minimum); three rows, two columns
    assert grid.width > 2 * 64 and grid.height > 3 * 64
    reds = np.argwhere((px == [255, 0, 0]).all(-1))
    blues = np.argwhere((px == [0, 0, 255]).all(-1))
    assert len(reds) == 2 * 40 * 40 and len(blues) == 40 * 40
    assert reds[:, 1].max() < blues[:, 1].min()  # LoRA column left of the Flat-LoRA column
    assert (px == [225, 225, 225]).all(-1).sum() >= 64 * 64  # the missing image is a grey cell
    # no row labels: no left margin, still labelled columns
    plain = sample.comparison_grid([("a", [red]), ("b", [blue])])
    assert plain.width < grid.width
    with pytest.raises(ValueError):
        sample.comparison_grid([])
