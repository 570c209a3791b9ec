"""flatlora_diffusion.data: captions, repeats, EXIF, crops, flips, buckets, class images, validation."""

from __future__ import annotations

import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flatlora_diffusion import data as D
from flatlora_diffusion.data import (
    BucketBatchSampler,
    BucketConfig,
    DataError,
    DreamBoothDataset,
    ImageRecord,
    collate_fn,
    generate_class_images,
    load_hf_dataset_records,
    make_buckets,
    make_dataloader,
    scan_image_folder,
    validate_data_args,
)


# --------------------------------------------------------------------------- helpers


def save_image(path: Path, w: int = 16, h: int = 16, color=(200, 30, 30), **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path, **save_kwargs)
    return path


def coord_image(path: Path, w: int, h: int) -> Path:
    """Red encodes x (5 per px), green encodes y (10 per px): a crop's pixels reveal where it came from."""
    xs = np.arange(w, dtype=np.uint8)[None, :].repeat(h, 0) * 5
    ys = np.arange(h, dtype=np.uint8)[:, None].repeat(w, 1) * 10
    arr = np.stack([xs, ys, np.zeros_like(xs)], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)
    return path


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels + 1) * 127.5).round().to(torch.int64).numpy()


def warnings_list():
    seen: list[str] = []
    return seen, seen.append


# --------------------------------------------------------------------------- captions, repeats, scanning


def test_caption_precedence_and_kohya_repeats(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("\ufeffcaption from file\nsecond line\n", encoding="utf-8")
    save_image(tmp_path / "b.png")
    save_image(tmp_path / "10_sks dog" / "c.png")
    save_image(tmp_path / "10_sks dog" / "d.jpg")
    (tmp_path / "10_sks dog" / "d.txt").write_text("d caption")

    with_prompt = {r.path.name: r for r in scan_image_folder(tmp_path, "a photo of sks")}
    assert with_prompt["a.png"].caption == "caption from file"  # .txt beats the prompt (BOM stripped)
    assert with_prompt["b.png"].caption == "a photo of sks"
    assert with_prompt["c.png"].caption == "a photo of sks"  # the prompt beats folder tokens
    assert with_prompt["d.jpg"].caption == "d caption"
    assert with_prompt["c.png"].repeats == 10 and with_prompt["a.png"].repeats == 1

    records = [r for r in scan_image_folder(tmp_path, "x") if r.path.parent.name == "10_sks dog"]
    assert [r.path.name for r in records] == ["c.png", "d.jpg"]  # sorted, deterministic
    # The folder's own tokens are the caption when there is neither a .txt nor a prompt.
    nested = tmp_path / "nested"
    save_image(nested / "3_sks cat" / "e.png")
    (rec,) = scan_image_folder(nested, None)
    assert (rec.caption, rec.repeats) == ("sks cat", 3)


def test_scan_order_is_root_then_subfolders_sorted(tmp_path):
    for name in ["z.png", "a.png", "2_x/b.png", "1_y/c.png"]:
        save_image(tmp_path / name)
    names = [r.path.relative_to(tmp_path).as_posix() for r in scan_image_folder(tmp_path, "p")]
    assert names == ["a.png", "z.png", "1_y/c.png", "2_x/b.png"]


def test_unreadable_image_is_skipped_with_warning(tmp_path):
    save_image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really an image")
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) - 20])  # header fine, data cut off
    (tmp_path / "notes.md").write_text("ignored: not an image extension")
    seen, warn = warnings_list()
    records = scan_image_folder(tmp_path, "p", warn=warn)
    assert [r.path.name for r in records] == ["good.png"]
    assert len(seen) == 2 and "broken.png" in seen[0] and "truncated.png" in seen[1]


def test_image_without_caption_source_is_an_error(tmp_path):
    save_image(tmp_path / "lonely.png")
    with pytest.raises(DataError, match=r"lonely\.png.*--instance_prompt"):
        scan_image_folder(tmp_path, None)


@pytest.mark.parametrize(
    "setup, pattern",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "not a folder"),
        (lambda p: p.mkdir(), "holds no images"),
        (lambda p: (p.mkdir(), (p / "x.png").write_bytes(b"garbage")), "could be read"),
    ],
    ids=["missing", "file", "empty", "no-readable"],
)
def test_bad_folders_raise_one_line_data_error(tmp_path, setup, pattern):
    folder = tmp_path / "imgs"
    setup(folder)
    with pytest.raises(DataError, match=pattern) as info:
        scan_image_folder(folder, "p", warn=lambda m: None)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


def test_misnamed_subfolder_is_ignored_with_warning(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "extras" / "b.png")
    seen, warn = warnings_list()
    assert [r.path.name for r in scan_image_folder(tmp_path, "p", warn=warn)] == ["a.png"]
    assert any("extras" in m and "10_sks dog" in m for m in seen)


# --------------------------------------------------------------------------- EXIF, crops, flips


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 = turn 90° clockwise
    # to display, so the displayed image is 20 wide x 40 high with red on top.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)

    rec = ImageRecord(path, "p")
    assert rec.size() == (20, 40)  # header-only size is the displayed one
    ds = DreamBoothDataset([rec], resolution=16, center_crop=True, seed=0)
    (ex,) = ds[0]
    assert ex.original_size == (40, 20)  # (h, w) of the displayed image
    assert ex.target_size == (16, 16)
    px = to_uint8(ex.pixel_values)
    assert px[0, 1, 8] > 200 and px[2, 1, 8] < 60  # top row red
    assert px[2, 14, 8] > 200 and px[0, 14, 8] < 60  # bottom row blue


def test_center_crop_coordinates(tmp_path):
    rec = ImageRecord(coord_image(tmp_path / "wide.png", 48, 24), "p")
    (ex,) = DreamBoothDataset([rec], resolution=24, center_crop=True, interpolation="nearest")[0]
    assert ex.original_size == (24, 48) and ex.crop_top_left == (0, 12) and ex.target_size == (24, 24)
    px = to_uint8(ex.pixel_values)
    assert px[0, 0, 0] == 12 * 5 and px[1, 0, 0] == 0  # the crop's first pixel is x=12, y=0

    tall = ImageRecord(coord_image(tmp_path / "tall.png", 12, 24), "p")
    (ex,) = DreamBoothDataset([tall], resolution=12, center_crop=True, interpolation="nearest")[0]
    assert ex.crop_top_left == (6, 0) and to_uint8(ex.pixel_values)[1, 0, 0] == 6 * 10


def test_random_crop_matches_pixels_and_flip_is_accounted(tmp_path):
    # 48x24 at resolution 24: no resize, so each crop's first pixel names its source column exactly.
    rec = ImageRecord(coord_image(tmp_path / "wide.png", 48, 24), "p", repeats=12)
    ds = DreamBoothDataset([rec], resolution=24, center_crop=False, random_flip=True, seed=3)
    lefts, flips = set(), set()
    for i in range(len(ds)):
        (ex,) = ds[i]
        top, left = ex.crop_top_left
        assert top == 0 and 0 <= left <= 24
        red = to_uint8(ex.pixel_values)[0, 0]
        flipped = bool(red[0] > red[-1])
        # crop_top_left is in the (flipped) resized image: column `left` there is 47 - left here.
        assert red[0] == 5 * ((47 - left) if flipped else left)
        lefts.add(left)
        flips.add(flipped)
    assert len(lefts) > 3 and flips == {True, False}


def test_flip_and_crop_reproducible_per_seed_and_epoch(tmp_path):
    rec = ImageRecord(coord_image(tmp_path / "wide.png", 48, 24), "p", repeats=16)

    def run(seed, epoch=0):
        ds = DreamBoothDataset([rec], resolution=16, random_flip=True, seed=seed)
        ds.set_epoch(epoch)
        return [ds[i][0] for i in range(len(ds))]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x.pixel_values, y.pixel_values) for x, y in zip(a, b))
    assert [x.crop_top_left for x in a] == [y.crop_top_left for y in b]
    sig = lambda exs: [(e.crop_top_left, float(e.pixel_values[0, 0, 0])) for e in exs]  # noqa: E731
    assert sig(a) != sig(c)
    assert sig(a) != sig(run(1, epoch=1))


def test_iterating_leaves_global_rngs_untouched(tmp_path):
    rec = ImageRecord(coord_image(tmp_path / "wide.png", 48, 24), "p", repeats=4)
    cls = ImageRecord(save_image(tmp_path / "c.png", 20, 20), "a dog")
    ds = DreamBoothDataset([rec], [cls], resolution=16, random_flip=True, seed=5)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    for epoch in range(2):
        loader = make_dataloader(ds, batch_size=2, seed=5)
        loader.batch_sampler.set_epoch(epoch)
        for _ in loader:
            pass
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_alpha_becomes_white_and_pixels_in_range(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    (ex,) = DreamBoothDataset([ImageRecord(path, "p")], resolution=8)[0]
    assert ex.pixel_values.dtype == torch.float32 and ex.pixel_values.shape == (3, 8, 8)
    assert torch.allclose(ex.pixel_values, torch.ones(3, 8, 8))


# --------------------------------------------------------------------------- prior preservation


def test_class_examples_have_their_own_micro_conditioning(tmp_path):
    inst = [ImageRecord(save_image(tmp_path / f"i{k}.png", 32, 32), "sks dog") for k in range(2)]
    cls = [ImageRecord(save_image(tmp_path / f"c{k}.png", 48, 24, (0, 0, 200)), "a dog") for k in range(3)]
    ds = DreamBoothDataset(inst, cls, resolution=16, center_crop=True, seed=0)
    assert len(ds) == 3  # max(instances, classes), as diffusers
    instance, klass = ds[2]
    assert instance.original_size == (32, 32) and not instance.is_class
    assert klass.original_size == (24, 48) and klass.crop_top_left == (0, 8) and klass.is_class
    assert klass.prompt == "a dog" and instance.prompt == "sks dog"

    batch = collate_fn([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["is_class"].tolist() == [False, False, True, True]  # instance half, then class half
    assert batch["prompts"] == ["sks dog", "sks dog", "a dog", "a dog"]
    assert batch["original_sizes"].tolist() == [[32, 32], [32, 32], [24, 48], [24, 48]]
    assert batch["crop_top_lefts"].shape == (4, 2) and batch["target_sizes"].tolist() == [[16, 16]] * 4
    assert batch["time_ids"][2].tolist() == [24, 48, 0, 8, 16, 16]


def test_repeats_expand_instance_images(tmp_path):
    recs = [ImageRecord(save_image(tmp_path / "a.png"), "p", repeats=3), ImageRecord(save_image(tmp_path / "b.png"), "p")]
    assert len(DreamBoothDataset(recs, resolution=8, repeats=2)) == 8


# --------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("resolution, step", [(512, 64), (1024, 64), (64, 8), (64, 16)])
def test_make_buckets_area_and_step(resolution, step):
    buckets = make_buckets(resolution, step=step)
    assert (resolution // step * step,) * 2 in buckets
    assert any(w >= 2 * h for w, h in buckets) and any(h >= 2 * w for w, h in buckets)
    for w, h in buckets:
        assert w * h <= resolution * resolution
        assert w % step == 0 and h % step == 0


def test_bucket_config_rejects_steps_the_vae_cannot_use():
    with pytest.raises(DataError, match="multiple of 8"):
        BucketConfig(step=12)
    with pytest.raises(DataError, match="above the max"):
        BucketConfig(min_reso=512, max_reso=256)
    with pytest.raises(DataError, match="multiples of 8"):
        DreamBoothDataset([ImageRecord(None, "p", image=Image.new("RGB", (8, 8)))], resolution=8,
                          buckets=[(100, 60)])


def test_wide_image_lands_in_wide_bucket_and_batches_never_mix(tmp_path):
    recs = [
        ImageRecord(save_image(tmp_path / "wide.png", 64, 32), "p", repeats=5),
        ImageRecord(save_image(tmp_path / "tall.png", 30, 60), "p", repeats=4),
        ImageRecord(save_image(tmp_path / "square.png", 40, 40), "p", repeats=3),
    ]
    ds = DreamBoothDataset(recs, resolution=48, buckets=BucketConfig(step=8), seed=0)
    w, h = ds.bucket_of(0)
    assert w > h and 1.6 < w / h < 2.5 and w * h <= 48 * 48
    tw, th = ds.bucket_of(5)
    assert th > tw
    assert ds.bucket_of(9) == (48, 48)

    sampler = BucketBatchSampler(ds, batch_size=2, seed=7)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert len(batches) == len(sampler) == 3 + 2 + 2
    for b in batches:
        assert len({ds.bucket_of(i) for i in b}) == 1
    for batch in make_dataloader(ds, batch_size=2, seed=7):
        (B, _, H, W), (h, w) = batch["pixel_values"].shape, batch["target_sizes"][0].tolist()
        assert (H, W) == (h, w)

    assert list(BucketBatchSampler(ds, 2, seed=7)) == batches  # same seed, same order
    other = BucketBatchSampler(ds, 2, seed=7)
    other.set_epoch(1)
    assert list(other) != batches and ds.epoch == 1
    assert len(BucketBatchSampler(ds, 2, seed=7, drop_last=True)) == 2 + 2 + 1


def test_plain_sampler_without_buckets_is_seeded(tmp_path):
    ds = DreamBoothDataset([ImageRecord(save_image(tmp_path / "a.png"), "p", repeats=10)], resolution=8)
    a = list(BucketBatchSampler(ds, 3, seed=1))
    assert a == list(BucketBatchSampler(ds, 3, seed=1)) != list(BucketBatchSampler(ds, 3, seed=2))
    assert sorted(len(b) for b in a) == [1, 3, 3, 3]


def test_no_upscale_keeps_small_images_small(tmp_path):
    rec = ImageRecord(save_image(tmp_path / "small.png", 21, 13), "p")
    ds = DreamBoothDataset([rec], resolution=64, buckets=BucketConfig(step=8, no_upscale=True))
    (ex,) = ds[0]
    assert ds.bucket_of(0) == (16, 8) and ex.target_size == (8, 16)


# --------------------------------------------------------------------------- class image generation


class FakePipeline:
    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[int] = []
        self.fail_on_call = fail_on_call

    def __call__(self, prompt, generator, **kwargs):
        self.calls.append(len(prompt))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("CUDA out of memory (fake)")
        images = []
        for g in generator:
            value = int(torch.randint(0, 256, (), generator=g))
            images.append(Image.new("RGB", (8, 8), (value, 0, 0)))
        return types.SimpleNamespace(images=images)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_generate_class_images_fills_up_deterministically(tmp_path):
    class_dir = tmp_path / "class"
    save_image(class_dir / "mine.png")
    (class_dir / "junk.png").write_bytes(b"not an image")  # not counted
    progress = []
    pipe = FakePipeline()
    n = generate_class_images(pipe, class_dir, "a photo of a dog", 6, sample_batch_size=2, seed=0,
                              progress=lambda done, total: progress.append((done, total)))
    assert n == 5 and pipe.calls == [2, 2, 1] and progress == [(2, 5), (4, 5), (5, 5)]
    new = [f for f in _files(class_dir) if f.startswith("class-")]
    assert len(new) == 5 and all(f.endswith(".png") for f in new)
    assert len(scan_image_folder(class_dir, "x", warn=lambda m: None)) == 6

    assert generate_class_images(FakePipeline(), class_dir, "a photo of a dog", 6, 2, seed=0) == 0

    # Same seed, other batch size: same pixels.
    other = tmp_path / "other"
    save_image(other / "mine.png")
    generate_class_images(FakePipeline(), other, "a photo of a dog", 6, sample_batch_size=4, seed=0)
    for name in new:
        assert np.array_equal(np.asarray(Image.open(class_dir / name)), np.asarray(Image.open(other / name)))


def test_generate_class_images_never_leaves_partial_files(tmp_path, monkeypatch):
    class_dir = tmp_path / "class"
    with pytest.raises(RuntimeError):
        generate_class_images(FakePipeline(fail_on_call=2), class_dir, "a dog", 5, sample_batch_size=2, seed=0)
    assert len(_files(class_dir)) == 2  # the first batch, complete

    # A kill in the middle of a write: the save dies and no cleanup runs (unlink does nothing).
    real_save = Image.Image.save
    calls = {"n": 0}

    def dying_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            fp.write(b"\x89PNG half")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(FakePipeline(), class_dir, "a dog", 5, sample_batch_size=2, seed=0)
    monkeypatch.undo()
    visible = [f for f in _files(class_dir) if not f.startswith(".")]
    assert len(visible) == 3
    for f in visible:
        Image.open(class_dir / f).load()  # every image file left is whole; the half one is hidden
    seen, warn = warnings_list()
    assert len(scan_image_folder(class_dir, "a dog", warn=warn)) == 3 and not seen

    assert any(f.endswith(".tmp") for f in _files(class_dir))
    assert generate_class_images(FakePipeline(), class_dir, "a dog", 3, sample_batch_size=2, seed=0) == 0
    assert len(_files(class_dir)) == 3  # the next run removed the stale temporary file
    assert generate_class_images(FakePipeline(), class_dir, "a dog", 5, sample_batch_size=2, seed=0) == 2


# --------------------------------------------------------------------------- validation


def _args(tmp_path, **over):
    folder = tmp_path / "inst"
    if not folder.exists():
        save_image(folder / "a.png")
    base = dict(instance_data_dir=folder, dataset_name=None, instance_prompt="sks dog",
                with_prior_preservation=False, class_data_dir=None, class_prompt=None, resolution=512)
    base.update(over)
    return base


def test_validate_data_args_accepts_good_args(tmp_path):
    records = validate_data_args(**_args(tmp_path))
    assert [r.caption for r in records] == ["sks dog"]
    assert validate_data_args(**_args(tmp_path, instance_data_dir=None, dataset_name="x/y")) is None
    ok = _args(tmp_path, with_prior_preservation=True, class_data_dir=tmp_path / "cls", class_prompt="a dog")
    assert validate_data_args(**ok)


@pytest.mark.parametrize(
    "over, pattern",
    [
        (dict(instance_data_dir=None), "--instance_data_dir.*--dataset_name"),
        (dict(dataset_name="x/y"), "only one"),
        (dict(instance_data_dir="/nonexistent/imgs"), "does not exist"),
        (dict(with_prior_preservation=True, class_data_dir="c"), "--class_prompt"),
        (dict(with_prior_preservation=True, class_prompt="a dog"), "--class_data_dir"),
        (dict(resolution=500), "multiple of 8.*try 504"),
        (dict(resolution=0), "multiple of 8"),
        (dict(resolution=-64), "multiple of 8"),
        (dict(instance_prompt=None), "no caption"),
        (dict(instance_data_dir=None, dataset_name="x/y", instance_prompt=None), "--caption_column"),
    ],
)
def test_validate_data_args_errors(tmp_path, over, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        validate_data_args(**_args(tmp_path, **over))
    assert "\n" not in str(info.value)


def test_validate_empty_and_unreadable_instance_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        validate_data_args(**_args(tmp_path, instance_data_dir=tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataError, match="could be read"):
        validate_data_args(**_args(tmp_path, instance_data_dir=tmp_path / "bad"), warn=lambda m: None)


# --------------------------------------------------------------------------- Hugging Face datasets


def test_hf_dataset_missing_library_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_hf_dataset_records("user/dogs", None, "image", None, "sks dog", None)


class _FakeSplit:
    def __init__(self, columns):
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key):
        return self._columns[key]


def _fake_datasets(monkeypatch, columns):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"train": _FakeSplit(columns)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_dataset_records_in_memory(monkeypatch, tmp_path):
    imgs = [Image.new("RGB", (24, 12), (9, 9, 9)), Image.new("RGB", (8, 8))]
    calls = _fake_datasets(monkeypatch, {"image": imgs, "text": ["a caption", ""]})
    recs = load_hf_dataset_records("user/dogs", None, "image", "text", "sks dog", str(tmp_path))
    assert [r.caption for r in recs] == ["a caption", "sks dog"]  # empty caption falls back to the prompt
    assert recs[0].path is None and recs[0].image is imgs[0]
    assert calls[0][0] == ("user/dogs", None) and calls[0][1]["cache_dir"] == str(tmp_path)
    (ex,) = DreamBoothDataset(recs, resolution=8, center_crop=True)[0]
    assert ex.original_size == (12, 24) and ex.crop_top_left == (0, 4)

    local = tmp_path / "local"
    local.mkdir()
    load_hf_dataset_records(str(local), None, "image", "text", "sks dog", None)
    assert calls[-1][0] == ("imagefolder",) and calls[-1][1]["data_dir"] == str(local)

    with pytest.raises(DataError, match="image column 'img'.*image, text"):
        load_hf_dataset_records("user/dogs", None, "img", "text", None, None)
    with pytest.raises(DataError, match="caption column"):
        load_hf_dataset_records("user/dogs", None, "image", "caption", None, None)
    with pytest.raises(DataError, match="row 1"):
        load_hf_dataset_records("user/dogs", None, "image", "text", None, None)
    n_calls = len(calls)
    with pytest.raises(DataError, match="--instance_prompt or --caption_column"):
        load_hf_dataset_records("user/dogs", None, "image", None, None, None)
    assert len(calls) == n_calls  # refused before loading anything


def test_hf_dataset_load_failure_is_one_line(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise FileNotFoundError("Couldn't find dataset user/nope on the Hub\nmore details")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match="^could not load dataset 'user/nope': Couldn't find") as info:
        load_hf_dataset_records("user/nope", None, "image", None, "sks", None)
    assert "\n" not in str(info.value)


def test_load_class_records_takes_the_first_n(tmp_path):
    for k in range(4):
        save_image(tmp_path / f"{k}.png")
    recs = D.load_class_records(tmp_path, "a dog", 3)
    assert [r.path.name for r in recs] == ["0.png", "1.png", "2.png"] and recs[0].caption == "a dog"


def test_bad_interpolation_mode_is_a_data_error(tmp_path):
    rec = ImageRecord(save_image(tmp_path / "a.png"), "p")
    with pytest.raises(DataError, match="lanczos"):
        DreamBoothDataset([rec], resolution=8, interpolation="cubic-ish")
    for mode in D.INTERPOLATION_MODES:
        DreamBoothDataset([rec], resolution=8, interpolation=mode)[0]
