"""A real CLIP tokenizer, built offline: byte-level BPE merges learned on a small built-in corpus (the words of
the tests, the demo and typical DreamBooth prompts), saved in CLIP's layout so that CLIPTokenizer loads it."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Words the tests, the demo and typical DreamBooth prompts use, so that they tokenize into a few
# whole-word tokens (as in the real CLIP vocabulary) rather than into single bytes.
CORPUS = """
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


def _train_merges(max_merges: int, corpus: str = CORPUS) -> list[tuple[str, str]]:
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


def write_vocab_files(out_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_clip_tokenizer(out_dir, corpus: str = CORPUS):
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
    write_vocab_files(out, vocab, merges)
    return load_tokenizer(out)


def load_tokenizer(path, **kwargs):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(path), **kwargs)
    # Offline, from_pretrained on a folder without tokenizer files silently returns a 2-token tokenizer.
    if len(tokenizer) <= 2:
        raise RuntimeError(f"{path} holds no usable CLIP tokenizer (it loaded with {len(tokenizer)} tokens)")
    return tokenizer


def read_merges(tokenizer_dir: Path) -> list[tuple[str, str]]:
    """The merges of a saved tokenizer (its merges.txt), in order."""
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ", 1)) for line in lines[1:] if line]
