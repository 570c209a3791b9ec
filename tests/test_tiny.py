"""The offline tiny models: a real CLIP tokenizer, real SD1/SDXL pipeline folders, subject images,
and single-file checkpoints in the original SD layout that diffusers loads back weight for weight."""

import json
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flatlora_diffusion import tiny

PROMPT = "a photo of sks dog"


def _weight_files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*.safetensors"))


def _all_tensors(folder):
    return {f"{path}:{k}": v for path in _weight_files(folder) for k, v in load_file(folder / path).items()}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    tiny.build_clip_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """One folder per arch, built once for the module (seed 0)."""
    return {arch: tiny.make_tiny_pipeline(tmp_path_factory.mktemp(arch), arch=arch, seed=0) for arch in tiny.ARCHES}


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_encodes_like_clip(tok_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tok_dir)
    assert len(tok) > 500
    assert tok.model_max_length == 77
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.bos_token == "<|startoftext|>"

    ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    # whole words of the built-in corpus are single tokens, with CLIP's end-of-word marker
    assert tok.convert_ids_to_tokens(ids[1:6]) == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    assert ids[6:] == [tok.eos_token_id] * 71
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    # CLIP lower-cases, and byte-level BPE never needs an unknown token
    assert tok("A Photo OF SKS Dog").input_ids == tok(PROMPT).input_ids
    text = "a cat, émigré 42!"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")


def test_tokenizer_files_have_clip_layout(tok_dir):
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    by_id = sorted(vocab, key=vocab.get)
    assert list(vocab.values()) == list(range(len(vocab)))
    assert by_id[0] == "!" and all(len(t) == 1 for t in by_id[:256])
    assert by_id[256:512] == [t + "</w>" for t in by_id[:256]]
    assert by_id[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    for line in merges[1:]:
        a, b = line.split(" ")
        assert a + b in vocab


def test_tokenizer_reloads_equal_and_builds_fast(tok_dir, tmp_path):
    from transformers import CLIPTokenizer

    start = time.perf_counter()
    built = tiny.build_clip_tokenizer(tmp_path / "again")
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"building the tokenizer took {seconds:.2f} s"

    reloaded = CLIPTokenizer.from_pretrained(tok_dir)
    assert built.get_vocab() == reloaded.get_vocab()
    assert built(PROMPT).input_ids == reloaded(PROMPT).input_ids


# ---------------------------------------------------------------- pipelines


@pytest.mark.parametrize("arch", tiny.ARCHES)
def test_pipeline_folder_loads_and_generates(pipeline_dirs, arch):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = pipeline_dirs[arch]
    expected = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[arch]
    parts = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if arch == "sdxl":
        parts |= {"text_encoder_2", "tokenizer_2"}
    assert parts <= {p.name for p in folder.iterdir()}
    assert all(str(p).endswith(".safetensors") for p in _weight_files(folder))
    assert not list(folder.rglob("*.bin"))

    pipe = expected.from_pretrained(folder)
    assert type(DiffusionPipeline.from_pretrained(folder)) is expected
    assert pipe.vae.config.scaling_factor == {"sd15": 0.18215, "sdxl": 0.13025}[arch]
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    if arch == "sd15":
        assert pipe.safety_checker is None

    out = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="pil",
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)
    default = pipe(PROMPT, num_inference_steps=1, output_type="pil").images[0]
    assert default.size == (64, 64)


@pytest.mark.parametrize("arch", tiny.ARCHES)
def test_pipeline_weights_follow_seed(pipeline_dirs, tmp_path, arch):
    torch.manual_seed(1234)
    expected_draw = torch.rand(3)
    torch.manual_seed(1234)
    same = tiny.make_tiny_pipeline(tmp_path / "same", arch=arch, seed=0)
    assert torch.equal(torch.rand(3), expected_draw), "make_tiny_pipeline must not move the global RNG"
    other = tiny.make_tiny_pipeline(tmp_path / "other", arch=arch, seed=1)

    reference = _all_tensors(pipeline_dirs[arch])
    again = _all_tensors(same)
    assert reference.keys() == again.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)

    # token ids index the embedding tables, so the tokenizer files must not vary either
    for sub in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
        for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
            assert (same / sub / name).read_bytes() == (pipeline_dirs[arch] / sub / name).read_bytes()

    different = _all_tensors(other)
    for key in ("unet/diffusion_pytorch_model.safetensors:conv_in.weight",
                "vae/diffusion_pytorch_model.safetensors:encoder.conv_in.weight"):
        assert not torch.equal(reference[key], different[key])
    te_key = next(k for k in reference if k.startswith("text_encoder/") and k.endswith("token_embedding.weight"))
    assert not torch.equal(reference[te_key], different[te_key])


def test_sdxl_encoder_widths_feed_the_unet(pipeline_dirs):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dirs["sdxl"])
    te1, te2, unet = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.unet.config
    assert te1.hidden_size + te2.hidden_size == unet.cross_attention_dim
    # the two widths differ, as in the real model (768 / 1280); diffusers' single-file loader relies on it
    assert te1.hidden_size != te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert unet.addition_embed_type == "text_time"
    assert pipe.tokenizer_2.pad_token == "!" and te2.pad_token_id == pipe.tokenizer_2.pad_token_id == 0
    assert te1.vocab_size == len(pipe.tokenizer) and te1.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert getattr(pipe, "watermark", None) is None


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sd15"):
        tiny.make_tiny_pipeline(tmp_path, arch="sd3")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- subject images


def test_subject_images(tmp_path):
    paths = tiny.make_subject_images(tmp_path / "a", n=5, size=64, seed=3)
    assert len(paths) == 5 and len(set(paths)) == 5
    for path in paths:
        assert path.suffix == ".png"
        with Image.open(path) as image:
            image.load()
            assert image.size == (64, 64) and image.mode == "RGB"
    pixels = [Image.open(p).tobytes() for p in paths]
    assert len(set(pixels)) == 5, "every picture shows the subject differently"

    again = tiny.make_subject_images(tmp_path / "b", n=5, size=64, seed=3)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    other = tiny.make_subject_images(tmp_path / "c", n=5, size=64, seed=4)
    assert [p.read_bytes() for p in other] != [p.read_bytes() for p in paths]


def test_subject_images_with_sizes(tmp_path):
    sizes = [(96, 64), (64, 128), (80, 80)]
    paths = tiny.make_subject_images(tmp_path, sizes=sizes, seed=0)
    assert len(paths) == len(sizes)
    for path, size in zip(paths, sizes):
        with Image.open(path) as image:
            image.load()
            assert image.size == size


# ---------------------------------------------------------------- single-file checkpoints


@pytest.mark.parametrize("arch", tiny.ARCHES)
def test_single_file_checkpoint_round_trips(pipeline_dirs, tmp_path, arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = pipeline_dirs[arch]
    cls = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[arch]
    out_file = tiny.save_single_file_checkpoint(folder, tmp_path / "model.safetensors")
    reference = cls.from_pretrained(folder)

    # the original SD names, checked against the diffusers modules they must hold
    state = load_file(out_file)
    unet, vae = reference.unet, reference.vae
    assert torch.equal(state["model.diffusion_model.input_blocks.0.0.weight"], unet.conv_in.weight)
    assert torch.equal(state["model.diffusion_model.input_blocks.3.0.op.weight"],
                       unet.down_blocks[0].downsamplers[0].conv.weight)
    assert torch.equal(state["model.diffusion_model.middle_block.2.in_layers.2.weight"],
                       unet.mid_block.resnets[1].conv1.weight)
    assert torch.equal(state["model.diffusion_model.output_blocks.2.2.conv.weight"],
                       unet.up_blocks[0].upsamplers[0].conv.weight)
    assert torch.equal(state["model.diffusion_model.out.2.weight"], unet.conv_out.weight)
    assert torch.equal(state["first_stage_model.decoder.up.0.block.0.conv1.weight"],
                       vae.decoder.up_blocks[-1].resnets[0].conv1.weight)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    prefixes = {"model.diffusion_model.", "first_stage_model."}
    if arch == "sd15":
        prefixes.add("cond_stage_model.transformer.text_model.")
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    else:
        prefixes |= {"conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."}
        te2 = reference.text_encoder_2
        width = te2.config.hidden_size
        assert "model.diffusion_model.label_emb.0.0.weight" in state
        assert state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (
            3 * width, width)
        assert torch.equal(state["conditioner.embedders.1.model.text_projection"], te2.text_projection.weight.T)
    assert all(any(k.startswith(p) for p in prefixes) for k in state)

    loaded = cls.from_single_file(str(out_file), config=str(folder))
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    for name in components:
        want = getattr(reference, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        bad = [k for k in want if want[k].shape != got[k].shape or not torch.equal(want[k], got[k])]
        assert not bad, f"{name}: {len(bad)} tensors differ, e.g. {bad[:3]}"
    image = loaded(PROMPT, num_inference_steps=1, output_type="pil").images[0]
    assert image.size == (64, 64)
