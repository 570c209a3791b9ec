"""Tiny, offline Stable Diffusion 1.x / SDXL pipelines, a CLIP tokenizer and a synthetic subject.

Nothing here touches the network. The demo, the ``make-tiny-model`` command and the tests use these
parts in place of the real models: they are real diffusers pipelines (same classes, same folder layout,
same loading code paths) whose weights are random and whose sizes are tiny, so a training step or a
2-step generation at 64 px takes a fraction of a second on one CPU core.

Public API:
    ARCHES
    build_clip_tokenizer(out_dir) -> CLIPTokenizer
    make_tiny_pipeline(out_dir, arch="sd15", seed=0) -> Path
    make_subject_images(out_dir, n=4, size=64, seed=0, sizes=None) -> list[Path]
    save_single_file_checkpoint(pipeline_dir, out_file) -> Path
"""

from __future__ import annotations

import json
import math
import random
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from .unet_blocks import UNetLayout, diffusers_to_ldm

ARCHES = ("sd15", "sdxl")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Words the tests, the demo and typical DreamBooth prompts use, so that they tokenize into a few
# whole-word tokens (as in the real CLIP vocabulary) rather than into single bytes.
_CORPUS = """
a photo of sks dog. a photo of a dog. a photo of sks cat. a photo of a cat. a sks toy on a table.
a photo of a toy. a photo of a person. a portrait of a sks person. a painting in the style of sks.
an image in sks style. a drawing of a dog in the style of van gogh. a sketch of a cat, digital art.
a red and yellow smiling disc. a smiling face. a round red ball with yellow eyes.
a dog on the beach. a cat in the garden. a toy in the snow. a person in the city at night.
a close up photo of a dog wearing a hat. a dog sitting on a chair. a cat sleeping on a bed.
a man and a woman walking in a park. a child playing with a toy. a car on the road.
the quick brown fox jumps over the lazy dog. high quality, detailed, sharp focus, 4k, 8k.
best quality, masterpiece, ultra realistic, cinematic lighting, studio light, soft shadows.
low quality, blurry, ugly, deformed, bad anatomy, watermark, text, signature, jpeg artifacts.
oil painting, watercolor, pencil sketch, anime, cartoon, 3d render, pixel art, illustration.
blue sky, green grass, white background, black background, sunset, mountains, forest, river, sea.
red, orange, yellow, green, blue, purple, pink, brown, black, white, gray, gold, silver.
in the, on the, with a, at the, of the, and the, from the, by the, is a, it is, this is, that is.
one two three four five six seven eight nine ten. big small tall short old new young happy sad.
front view, side view, back view, full body, upper body, wide shot, macro photo, bokeh.
house, tree, flower, bird, horse, fish, water, fire, light, dark, moon, sun, star, cloud, rain.
wearing glasses, wearing a red scarf, holding a flower, looking at the camera, smiling.
""".strip()

# Target size of the whole vocabulary (bytes + merges + 2 special tokens); the corpus may give fewer.
_TARGET_VOCAB = 1000


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in the order GPT-2/CLIP number them.

    Printable latin-1 bytes stand for themselves; the remaining bytes (controls, space, ...) are moved
    to code points 256, 257, ... so every byte has a visible, whitespace-free symbol.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    ordered = printable + [b for b in range(256) if b not in printable]
    return [symbols[b] for b in ordered]


def _clip_backend():
    """A `tokenizers` pipeline with CLIP's normalizer, split pattern and byte-level mapping."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _corpus_words(corpus: str) -> Counter:
    """The corpus cut into words exactly as CLIP's tokenizer cuts text, as byte symbols with '</w>'."""
    backend = _clip_backend()
    words: Counter = Counter()
    for line in corpus.splitlines():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[tuple(word[:-1]) + (word[-1] + "</w>",)] += 1
    return words


def _train_merges(max_merges: int, corpus: str = _CORPUS) -> list[tuple[str, str]]:
    """Learn BPE merges on the built-in corpus: repeatedly merge the most frequent adjacent pair.

    The `tokenizers` BpeTrainer breaks ties between equally frequent pairs by ids that depend on hash
    order, so its vocabulary changes from run to run. Token ids must not: a pipeline built twice from
    one seed has to be the same model. Hence this small learner, with ties broken by the pair itself;
    `tokenizers` still does the normalizing, the splitting and (in CLIPTokenizer) the encoding.
    """
    counted = _corpus_words(corpus)
    words = [list(w) for w in counted]
    freqs = list(counted.values())
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)

    merges: list[tuple[str, str]] = []
    while pair_counts and len(merges) < max_merges:
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for wi in sorted(where.pop(best)):
            symbols = words[wi]
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= freqs[wi]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            merged, k = [], 0
            while k < len(symbols):
                if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == best:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            words[wi] = merged
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += freqs[wi]
                where[pair].add(wi)
    return merges


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's layout: bytes, bytes + '</w>', merge results in merge order, then the two specials."""
    base = _byte_symbols()
    tokens = base + [s + "</w>" for s in base]
    seen = set(tokens)
    for a, b in merges:
        merged = a + b
        if merged not in seen:  # two merge paths can build the same string; keep the first id
            seen.add(merged)
            tokens.append(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def _write_vocab_files(out_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_clip_tokenizer(out_dir, corpus: str = _CORPUS):
    """Train a small CLIP-style byte-level BPE tokenizer, save it to `out_dir`, and return it loaded back.

    The folder has vocab.json / merges.txt in CLIP's layout plus the transformers files, so
    ``CLIPTokenizer.from_pretrained(out_dir)`` gives a tokenizer that behaves like the real one
    (lower-casing, '</w>' word ends, <|startoftext|> ... <|endoftext|>, 77 positions, pad = <|endoftext|>).
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _train_merges(max_merges=_TARGET_VOCAB - 512 - 2, corpus=corpus)
    vocab = _clip_vocab(merges)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.save_pretrained(out)
    _write_vocab_files(out, vocab, merges)
    return _load_tokenizer(out)


def _load_tokenizer(path, **kwargs):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(path), **kwargs)
    # Offline, from_pretrained on a folder without tokenizer files silently returns a 2-token tokenizer.
    if len(tokenizer) <= 2:
        raise RuntimeError(f"{path} holds no usable CLIP tokenizer (it loaded with {len(tokenizer)} tokens)")
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------

# SD1 and SDXL differ in the VAE's latent scale; everything else in the VAE is the same tiny shape.
_VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}

# SDXL's two text encoders have different widths (768 / 1280 in the real model). Keeping them different
# here matters: diffusers' single-file loader tells the two apart by their width, and code that mixes
# them up fails loudly instead of passing by accident. 16 + 48 = the UNet's cross_attention_dim 64.
_SDXL_TE1_HIDDEN = 16
_SDXL_TE2_HIDDEN = 48
_SDXL_POOLED_DIM = 32  # TE2 projection_dim: the pooled text embedding that feeds the UNet's add_embedding
_SDXL_TIME_DIM = 8  # addition_time_embed_dim; 6 time ids -> 6 * 8 inputs to add_embedding


def _unet(arch: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=8,  # 8 latent px x 8 (VAE) = 64 px default generation
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    if arch == "sd15":
        return UNet2DConditionModel(cross_attention_dim=32, **common)
    return UNet2DConditionModel(
        cross_attention_dim=_SDXL_TE1_HIDDEN + _SDXL_TE2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_DIM + _SDXL_POOLED_DIM,
        **common,
    )


def _vae(arch: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),  # 4 blocks: 8x downscale like the real SD VAE
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=_VAE_SCALING[arch],
    )


def _text_config(tokenizer, hidden: int, act: str, projection_dim: int | None = None, pad_token_id=None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=act,
        projection_dim=projection_dim if projection_dim is not None else hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if pad_token_id is None else pad_token_id,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


def make_tiny_pipeline(out_dir, arch: str = "sd15", seed: int = 0) -> Path:
    """Write a complete, loadable diffusers pipeline folder with tiny random weights drawn from `seed`.

    arch "sd15": StableDiffusionPipeline (unet, vae, text_encoder, tokenizer, scheduler).
    arch "sdxl": StableDiffusionXLPipeline, plus text_encoder_2 (with projection) and tokenizer_2.
    tokenizer_2 pads with "!" (id 0), as the real SDXL tokenizer_2 does; tokenizer pads with <|endoftext|>.
    Weights are saved as safetensors. Returns the folder.
    """
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp) / "tokenizer")
        tokenizer_2 = _load_tokenizer(Path(tmp) / "tokenizer", pad_token="!") if arch == "sdxl" else None
        merges = _read_merges(Path(tmp) / "tokenizer")

    # Draw every weight from a private generator state: the same seed gives the same bytes, and the
    # caller's global torch RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(arch)
        vae = _vae(arch)
        if arch == "sd15":
            text_encoder = CLIPTextModel(_text_config(tokenizer, 32, "quick_gelu"))
        else:
            text_encoder = CLIPTextModel(_text_config(tokenizer, _SDXL_TE1_HIDDEN, "quick_gelu"))
            text_encoder_2 = CLIPTextModelWithProjection(
                _text_config(
                    tokenizer_2,
                    _SDXL_TE2_HIDDEN,
                    "gelu",
                    projection_dim=_SDXL_POOLED_DIM,
                    pad_token_id=tokenizer_2.pad_token_id,
                )
            )

    if arch == "sd15":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=_scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipe.save_pretrained(out, safe_serialization=True)

    # Hub folders carry CLIP's own vocab.json / merges.txt next to the transformers files; and the
    # load-time flags that transformers copies into tokenizer_config.json do not belong in a model folder.
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    for sub in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
        _write_vocab_files(out / sub, vocab, merges)
        config_file = out / sub / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for key in ("is_local", "local_files_only"):
            config.pop(key, None)
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _read_merges(tokenizer_dir: Path) -> list[tuple[str, str]]:
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ", 1)) for line in lines[1:] if line]


# ---------------------------------------------------------------------------------------------------
# Synthetic subject images
# ---------------------------------------------------------------------------------------------------


def _background(draw, w: int, h: int, rng: random.Random) -> None:
    """A two-colour vertical gradient with a few soft blobs, different for every image."""
    top = tuple(rng.randint(40, 230) for _ in range(3))
    bottom = tuple(rng.randint(40, 230) for _ in range(3))
    for y in range(h):
        t = y / max(h - 1, 1)
        draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randint(1, 3)):
        r = rng.uniform(0.05, 0.2) * min(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        colour = tuple(rng.randint(60, 200) for _ in range(3))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def _subject(draw, cx: float, cy: float, r: float, tilt: float) -> None:
    """The subject: a red disc with a yellow rim, two yellow eyes and a yellow smile."""
    yellow, red, dark = (250, 210, 30), (210, 30, 40), (60, 10, 10)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=yellow)
    ri = 0.82 * r
    draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=red)

    def rotate(dx, dy):
        c, s = math.cos(tilt), math.sin(tilt)
        return cx + c * dx - s * dy, cy + s * dx + c * dy

    er = 0.14 * r
    for side in (-1, 1):
        ex, ey = rotate(side * 0.33 * r, -0.25 * r)
        draw.ellipse([ex - er, ey - er, ex + er, ey + er], fill=yellow)
        pr = 0.5 * er
        draw.ellipse([ex - pr, ey - pr, ex + pr, ey + pr], fill=dark)
    smile = [rotate(0.45 * r * math.cos(a), 0.1 * r + 0.3 * r * math.sin(a))
             for a in (math.pi * k / 12 for k in range(1, 12))]
    draw.line(smile, fill=yellow, width=max(1, round(0.1 * r)), joint="curve")


def make_subject_images(out_dir, n: int = 4, size: int = 64, seed: int = 0, sizes=None) -> list[Path]:
    """Draw `n` PNG photos of one recognisable subject (a red-and-yellow smiling disc).

    Each image puts the subject at another position, scale and tilt, on another background; the set is
    a deterministic function of `seed`. `sizes`, if given, is a list of (width, height), one per image:
    it then sets the number of images (and `n` and `size` are not used). Writes no captions.
    Returns the paths, named subject_00.png, subject_01.png, ...
    """
    from PIL import Image, ImageDraw

    if sizes is None:
        if n < 1 or size < 8:
            raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
        sizes = [(size, size)] * n
    else:
        sizes = [(int(w), int(h)) for w, h in sizes]
        if not sizes or min(min(s) for s in sizes) < 8:
            raise ValueError(f"sizes must be a non-empty list of (w, h) with w, h >= 8, got {sizes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    supersample = 4  # draw large and shrink: smooth edges like a photo, not aliased pixel art
    paths = []
    for i, (w, h) in enumerate(sizes):
        big_w, big_h = w * supersample, h * supersample
        image = Image.new("RGB", (big_w, big_h))
        draw = ImageDraw.Draw(image)
        _background(draw, big_w, big_h, rng)
        r = rng.uniform(0.22, 0.38) * min(big_w, big_h)
        cx = rng.uniform(r, big_w - r)
        cy = rng.uniform(r, big_h - r)
        _subject(draw, cx, cy, r, tilt=rng.uniform(-0.4, 0.4))
        image = image.resize((w, h), Image.Resampling.LANCZOS)
        path = out / f"subject_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------
# Single-file checkpoint in the original Stable Diffusion ("LDM") layout
# ---------------------------------------------------------------------------------------------------

def _unet_key_to_ldm(key: str, layout: UNetLayout) -> str:
    """Map one diffusers UNet2DConditionModel parameter name to its name in the original SD UNet."""
    module, _, param = key.rpartition(".")
    ldm = diffusers_to_ldm(module, layout)
    if ldm is None:
        raise KeyError(f"no original-SD name known for UNet parameter {key!r}")
    return f"{ldm}.{param}"


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key_to_ldm(key: str, num_levels: int) -> str:
    """Map one diffusers AutoencoderKL parameter name to its name in the original SD VAE.

    The original decoder numbers its levels from the full-resolution end (up.0 runs last), the diffusers
    decoder in running order; the encoder numbers both the same way.
    """
    fixed = {"conv_norm_out": "norm_out"}
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(\w+)", key)
    if m:
        return f"{m[1]}.{fixed.get(m[2], m[2])}.{m[3]}"
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        level = num_levels - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN_TO_LDM[m[2]]}.{m[3]}"
    raise KeyError(f"no original-SD name known for VAE parameter {key!r}")


def _text_model_keys(state_dict: dict) -> dict:
    """transformers >= 5.6 drops the `text_model.` level in CLIPTextModel; the files keep it."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in state_dict.items()}


def _open_clip_text(state_dict: dict, prefix: str) -> dict:
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (SDXL's second text encoder).

    OpenCLIP keeps q, k, v as one packed in_proj matrix, names the MLP c_fc / c_proj, stores the position
    table as a bare parameter and the projection as (width, proj_dim), i.e. transposed.
    """
    out = {}
    layers: dict[int, dict[str, object]] = {}
    for key, value in _text_model_keys(state_dict).items():
        if key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.t()
        else:
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
            if not m:
                raise KeyError(f"no OpenCLIP name known for text encoder parameter {key!r}")
            i, rest = int(m[1]), m[2]
            qkv = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if qkv:
                layers.setdefault(i, {})[f"{qkv[1]}.{qkv[2]}"] = value
                continue
            rest = (rest.replace("self_attn.out_proj", "attn.out_proj")
                    .replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[f"{prefix}transformer.resblocks.{i}.{rest}"] = value
    import torch

    for i, parts in layers.items():
        for kind in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [parts[f"{p}.{kind}"] for p in ("q", "k", "v")], dim=0
            )
    return out


def _pipeline_arch(pipeline_dir: Path) -> str:
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    return "sdxl" if "text_encoder_2" in index else "sd15"


def ldm_state_dict(pipeline_dir) -> dict:
    """All weights of a diffusers SD1/SDXL pipeline folder, renamed to the original single-file layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipeline_dir = Path(pipeline_dir)
    arch = _pipeline_arch(pipeline_dir)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    layout = UNetLayout.from_config(unet.config)

    out = {}
    for key, value in unet.state_dict().items():
        out["model.diffusion_model." + _unet_key_to_ldm(key, layout)] = value
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        ldm = _vae_key_to_ldm(key, levels)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        out["first_stage_model." + ldm] = value

    te = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    te_prefix = "cond_stage_model.transformer." if arch == "sd15" else "conditioner.embedders.0.transformer."
    for key, value in _text_model_keys(te.state_dict()).items():
        out[te_prefix + key] = value
    if arch == "sdxl":
        te2 = CLIPTextModelWithProjection.from_pretrained(pipeline_dir, subfolder="text_encoder_2")
        out.update(_open_clip_text(te2.state_dict(), "conditioner.embedders.1.model."))
    return out


def save_single_file_checkpoint(pipeline_dir, out_file) -> Path:
    """Write the pipeline in `pipeline_dir` as one .safetensors file in the original SD / SDXL key layout.

    That is the layout ComfyUI and AUTOMATIC1111 users keep their models in: model.diffusion_model.*
    (UNet), first_stage_model.* (VAE), cond_stage_model.transformer.text_model.* (SD1 text encoder) or
    conditioner.embedders.0.transformer.text_model.* and conditioner.embedders.1.model.* (SDXL's CLIP-L
    and OpenCLIP-bigG style encoders). Load it back with
    ``StableDiffusion[XL]Pipeline.from_single_file(out_file, config=pipeline_dir)``.
    """
    from safetensors.torch import save_file

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in ldm_state_dict(pipeline_dir).items()}
    save_file(state, str(out_file), metadata={"format": "pt"})
    return out_file
