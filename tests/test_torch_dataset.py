"""The torch datasets: crops, determinism, decode-once, resize policy, workers, errors, uint8 channels-last
crops (the default) against float32 crops normalised in the loader."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from qfm.data import images
from qfm.data.manifest import RawDataset, ScoreScale, build_manifest
from qfm.data.splits import SplitProtocol
from qfm.data.torch_dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropConfig,
    ImageListDataset,
    ManifestCropDataset,
    collate_crops,
    make_loader,
    per_image,
)
from qfm.errors import ConfigError, DataError
from qfm.models import normalise_uint8, pixel_affine

W, H, S = 300, 260, 224
N_IMAGES = 10


def coordinate_image(width: int, height: int, tag: int) -> np.ndarray:
    """R = x mod 256, G = y mod 256, B = tag + 64 (x >= 256) + 128 (y >= 256): each pixel says where it is."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    return np.stack([x % 256, y % 256, tag + 64 * (x >= 256) + 128 * (y >= 256)], axis=-1).astype(np.uint8)


def channels_last(x: torch.Tensor) -> bool:
    """Memory (N, S, S, 3) behind a (N, 3, S, S) tensor (and not also plain contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def to_pixels(crops: torch.Tensor) -> np.ndarray:
    """(K, 3, S, S) crops -> (K, S, S, 3) uint8: uint8 crops as they are, float ones de-normalised."""
    if crops.dtype == torch.uint8:
        return crops.permute(0, 2, 3, 1).numpy()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((crops * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def window_of(crop: np.ndarray, image: np.ndarray) -> tuple[int, int, bool]:
    """(top, left, flipped) of the window of image that crop is; fails if it is no window."""
    s = crop.shape[0]
    for flipped in (False, True):
        view = crop[:, ::-1] if flipped else crop
        candidates = np.argwhere((image == view[0, 0]).all(axis=-1))
        for top, left in candidates:
            if top + s <= image.shape[0] and left + s <= image.shape[1] \
                    and np.array_equal(image[top:top + s, left:left + s], view):
                return int(top), int(left), flipped
    raise AssertionError("crop is not a window of the image")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    (root / "img").mkdir()
    rows = []
    for i in range(N_IMAGES):
        name = f"img/{i:02d}.png"
        Image.fromarray(coordinate_image(W, H, tag=i)).save(root / name)
        rows.append({"image_id": f"{i:02d}", "path": name, "mos_raw": 10.0 * i, "source": f"test row {i}"})
    noisy = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(root / "img/photo.jpg", quality=90)
    rows.append({"image_id": "photo", "path": "img/photo.jpg", "mos_raw": 55.0, "source": "test row jpg"})
    return root, pd.DataFrame(rows)


@pytest.fixture(scope="module")
def manifest(dataset_dir):
    root, table = dataset_dir
    raw = RawDataset(dataset="crops", root=root, scale=ScoreScale(0.0, 100.0), table=table)
    return build_manifest(raw, SplitProtocol(n_splits=2, seed=1), progress=False)


def all_rows(manifest, **kw) -> ManifestCropDataset:
    return ManifestCropDataset(manifest, None, None, **kw)


def png_pixels(dataset: ManifestCropDataset, index: int) -> np.ndarray:
    return np.array(Image.open(dataset.paths[index]).convert("RGB"))


def test_item_shapes_dtypes_and_scores(manifest):
    train = ManifestCropDataset(manifest, "split_0", "train", CropConfig(n_crops=4), train=True)
    test = ManifestCropDataset(manifest, "split_0", "test", CropConfig(), train=False)
    parts = manifest.frame["split_0"]
    assert len(train) == (parts == "train").sum() and len(test) == (parts == "test").sum()
    item = train[0]
    assert item["image"].shape == (4, 3, S, S) and item["image"].dtype == torch.uint8
    assert channels_last(item["image"]) and item["image"].permute(0, 2, 3, 1).is_contiguous()
    assert item["mos"].dtype == torch.float32 and item["mos"].ndim == 0
    row = manifest.frame.iloc[train.row_positions[0]]
    assert item["image_id"] == row["image_id"] and item["index"] == 0
    assert item["mos"].item() == pytest.approx(row["mos"])
    assert test[len(test) - 1]["image"].shape == (9, 3, S, S)
    assert len(all_rows(manifest)) == N_IMAGES + 1


def test_test_crops_are_deterministic_and_cover_corners(manifest):
    a = all_rows(manifest, config=CropConfig(test_grid=(3, 3)))
    b = all_rows(manifest, config=CropConfig(test_grid=(3, 3)))
    assert torch.equal(a[3]["image"], b[3]["image"])
    assert torch.equal(a[3]["image"], a[3]["image"])
    pixels = png_pixels(a, 3)
    windows = [window_of(c, pixels) for c in to_pixels(a[3]["image"])]
    room_y, room_x = H - S, W - S
    assert windows[0] == (0, 0, False)  # top-left corner
    assert windows[2] == (0, room_x, False)  # top-right
    assert windows[4] == (room_y // 2, room_x // 2, False)  # centre
    assert windows[6] == (room_y, 0, False)  # bottom-left
    assert windows[8] == (room_y, room_x, False)  # bottom-right


def test_test_grid_given_as_a_count():
    config = CropConfig(test_grid=5)
    assert config.grid_rows == [3, 2] and config.n_test_crops == 5
    positions = config.grid_positions(W, H)
    assert positions == [(0, 0), (0, 38), (0, 76), (36, 0), (36, 76)]
    assert CropConfig(test_grid="2x4").grid_rows == [4, 4]
    assert CropConfig(test_grid=1).grid_positions(W, H) == [(18, 38)]


def test_train_crops_are_random_windows_reproducible_per_seed_epoch_index(manifest):
    a = all_rows(manifest, config=CropConfig(n_crops=4), train=True, seed=7)
    b = all_rows(manifest, config=CropConfig(n_crops=4), train=True, seed=7)
    assert torch.equal(a[2]["image"], b[2]["image"])
    first = a[2]["image"].clone()
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], first)
    b.set_epoch(1)
    assert torch.equal(a[2]["image"], b[2]["image"])
    other_seed = all_rows(manifest, config=CropConfig(n_crops=4), train=True, seed=8)
    assert not torch.equal(other_seed[2]["image"], first)

    windows = []
    for epoch in range(3):
        a.set_epoch(epoch)
        for index in range(4):
            pixels = png_pixels(a, index)
            windows += [window_of(c, pixels) for c in to_pixels(a[index]["image"])]
    flips = [w[2] for w in windows]
    assert 0 < sum(flips) < len(flips)  # some crops flipped, some not
    assert len({w[:2] for w in windows}) > len(windows) // 2  # positions vary
    no_flip = all_rows(manifest, config=CropConfig(n_crops=4, hflip=False), train=True, seed=7)
    pixels = png_pixels(no_flip, 0)
    assert not any(window_of(c, pixels)[2] for c in to_pixels(no_flip[0]["image"]))


def test_each_item_is_decoded_once_for_all_its_crops(manifest, monkeypatch):
    calls = []
    original = images.load_rgb

    def counting_load_rgb(path, resize_to=None):
        calls.append(str(path))
        return original(path, resize_to)

    monkeypatch.setattr(images, "load_rgb", counting_load_rgb)
    train = all_rows(manifest, config=CropConfig(n_crops=4), train=True)
    test = all_rows(manifest, config=CropConfig(test_grid=(3, 3)))
    assert train[0]["image"].shape[0] == 4 and len(calls) == 1
    assert test[1]["image"].shape[0] == 9 and len(calls) == 2
    assert calls == [str(train.paths[0]), str(test.paths[1])]


def test_resize_to_fixed_size_512x384(tmp_path):
    gradient = np.zeros((H, W, 3), dtype=np.uint8)
    gradient[..., 0] = np.linspace(0, 255, W).round()[None, :]
    gradient[..., 1] = np.linspace(0, 255, H).round()[:, None]
    path = tmp_path / "gradient.png"
    Image.fromarray(gradient).save(path)
    config = CropConfig(resize=(512, 384), test_grid=(2, 2))
    assert config.resized_size(W, H) == (512, 384)
    assert config.grid_positions(512, 384) == [(0, 0), (0, 288), (160, 0), (160, 288)]
    crops = to_pixels(ImageListDataset([path], config)[0]["image"])
    resized = np.array(Image.fromarray(gradient).resize((512, 384), Image.Resampling.BILINEAR))
    assert np.abs(crops[3].astype(int) - resized[160:, 288:].astype(int)).max() <= 1
    assert tuple(crops[0][0, 0, :2]) == (0, 0) and tuple(crops[3][-1, -1, :2]) == (255, 255)
    float_crops = to_pixels(ImageListDataset([path], CropConfig(resize=(512, 384), test_grid=(2, 2),
                                                                dtype="float32"))[0]["image"])
    assert np.array_equal(float_crops, crops)
    assert CropConfig(resize="512x384").resize == (512, 384)
    assert CropConfig(resize=[512, 384]).resize == (512, 384)
    assert CropConfig(resize="short_side=300").resized_size(W, H) == (346, 300)


def test_reduced_decode_of_a_large_jpeg_reaches_the_same_size_and_nearly_the_same_pixels(tmp_path, monkeypatch):
    """With a resize, a JPEG at least twice the target is decoded at reduced scale (PIL draft) and resized to
    exactly the target; a PNG, a JPEG without resize, and a config without reduced_decode decode in full."""
    rng = np.random.default_rng(0)
    smooth = np.array(Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize(
        (1600, 1200), Image.Resampling.BICUBIC))
    jpeg, png = tmp_path / "large.jpg", tmp_path / "large.png"
    Image.fromarray(smooth).save(jpeg, quality=95)
    Image.fromarray(smooth).save(png)
    from PIL.JpegImagePlugin import JpegImageFile

    drafts = []
    original_draft = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: drafts.append(size) or
                        original_draft(self, mode, size))
    base = CropConfig(resize="short_side=300", test_grid=(2, 2))
    full, reduced = (ImageListDataset([jpeg], replace(base, reduced_decode=flag))[0]["image"] for flag in (False, True))
    assert drafts == [(400, 300)]  # only the reduced decode asked libjpeg for a smaller image
    assert full.shape == reduced.shape == (4, 3, 224, 224)
    difference = np.abs(to_pixels(full).astype(int) - to_pixels(reduced).astype(int))
    assert 0 < difference.mean() < 2.0  # another resampling path, the same picture
    assert torch.equal(ImageListDataset([png], replace(base, reduced_decode=True))[0]["image"],
                       ImageListDataset([png], base)[0]["image"])
    no_resize = CropConfig(test_grid=(2, 2), reduced_decode=True)
    assert torch.equal(ImageListDataset([jpeg], no_resize)[0]["image"],
                       ImageListDataset([jpeg], replace(no_resize, reduced_decode=False))[0]["image"])
    assert drafts == [(400, 300)]
    assert images.load_rgb(jpeg, base.resized_size).size == (400, 300)


def test_images_smaller_than_the_crop_are_scaled_up(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(coordinate_image(120, 100, tag=0)).save(path)
    config = CropConfig(n_crops=3)
    assert config.resized_size(120, 100) == (269, 224)
    assert config.resized_size(S, S) == (S, S)
    assert ImageListDataset([path], config)[0]["image"].shape == (9, 3, S, S)
    assert ImageListDataset([path], config, train=True)[0]["image"].shape == (3, 3, S, S)
    # a fixed resize below the crop size is scaled up too
    assert CropConfig(resize=(200, 100)).resized_size(W, H) == (448, 224)


def test_normalisation_uses_mean_and_std(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((S, S, 3), 128, dtype=np.uint8)).save(path)
    crops = ImageListDataset([path], CropConfig(test_grid=1, dtype="float32"))[0]["image"]
    assert crops.dtype == torch.float32 and crops.is_contiguous()
    expected = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert crops[0, :, 5, 5].tolist() == pytest.approx(expected, abs=1e-5)
    own = ImageListDataset([path], CropConfig(test_grid=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                              dtype="float32"))
    assert own[0]["image"][0, :, 0, 0].tolist() == pytest.approx([128 / 255 * 2 - 1] * 3, abs=1e-5)
    model_config = {"input_size": (3, 256, 256), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    from_model = CropConfig.from_data_config(model_config, n_crops=2)
    assert (from_model.crop_size, from_model.mean, from_model.std, from_model.n_crops) == \
        (256, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 2)


def test_loader_with_two_workers_matches_in_process_loading(manifest):
    test = all_rows(manifest)
    serial = list(make_loader(test, batch_size=4, workers=0))
    parallel = list(make_loader(test, batch_size=4, workers=2))
    assert [b["image_id"] for b in serial] == [b["image_id"] for b in parallel]
    for one, two in zip(serial, parallel):
        assert torch.equal(one["image"], two["image"]) and torch.equal(one["crop_index"], two["crop_index"])
    assert serial[0]["image"].shape == (4 * 9, 3, S, S)
    assert all(channels_last(b["image"]) and b["image"].dtype == torch.uint8 for b in serial + parallel)
    assert all(b["image"].is_shared() for b in parallel)  # batched in the workers' shared memory

    # set_epoch reaches persistent workers
    train = all_rows(manifest, config=CropConfig(n_crops=2), train=True, seed=3)
    loader = make_loader(train, batch_size=6, workers=2)
    epoch0 = torch.cat([b["image"] for b in loader])
    train.set_epoch(1)
    epoch1 = torch.cat([b["image"] for b in loader])
    reference = all_rows(manifest, config=CropConfig(n_crops=2), train=True, seed=3)
    reference.set_epoch(1)
    assert torch.equal(epoch1, torch.cat([reference[i]["image"] for i in range(len(reference))]))
    assert not torch.equal(epoch0, epoch1)


def test_collate_flattens_and_per_image_averages_back(manifest):
    dataset = all_rows(manifest, config=CropConfig(n_crops=3), train=True)
    batch = collate_crops([dataset[4], dataset[1]])
    assert batch["image"].shape == (6, 3, S, S) and channels_last(batch["image"])
    assert torch.equal(batch["image"][3:], dataset[1]["image"])
    assert batch["crop_index"].tolist() == [4, 4, 4, 1, 1, 1]
    assert batch["index"].tolist() == [4, 1] and batch["n_crops"].tolist() == [3, 3]
    assert batch["mos"].shape == (2,) and batch["image_id"] == [dataset.image_ids[4], dataset.image_ids[1]]
    index, mean, std = per_image(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), batch["crop_index"])
    assert index.tolist() == [1, 4]
    assert mean.tolist() == pytest.approx([5.0, 2.0]) and std.tolist() == pytest.approx([0.0, (2 / 3) ** 0.5])


def test_make_loader_batch_sampler_passthrough_and_shuffle_seed(manifest):
    dataset = all_rows(manifest, config=CropConfig(test_grid=1))
    batches = list(make_loader(dataset, workers=0, batch_sampler=[[0, 2], [5]]))
    assert [b["index"].tolist() for b in batches] == [[0, 2], [5]]
    with pytest.raises(ConfigError, match="shuffle=False"):
        make_loader(dataset, shuffle=True, batch_sampler=[[0]])
    order = [torch.cat([b["index"] for b in make_loader(dataset, 3, shuffle=True, seed=5)]) for _ in range(2)]
    assert torch.equal(order[0], order[1]) and sorted(order[0].tolist()) == list(range(len(dataset)))
    with pytest.raises(ConfigError, match="workers"):
        make_loader(dataset, workers=-1)


def test_row_selection_errors_and_masks(manifest):
    with pytest.raises(ConfigError, match="split_99"):
        ManifestCropDataset(manifest, "split_99", "train", CropConfig())
    with pytest.raises(ConfigError, match="validation"):
        ManifestCropDataset(manifest, "split_0", "validation", CropConfig())
    mask = np.zeros(len(manifest.frame), dtype=bool)
    mask[[1, 3]] = True
    masked = ManifestCropDataset(manifest, None, None, rows=mask)
    assert list(masked.row_positions) == [1, 3]
    test_only = ManifestCropDataset(manifest, "split_1", "test", rows=np.ones(len(mask), dtype=bool))
    assert (manifest.frame["split_1"].iloc[test_only.row_positions] == "test").all()
    with pytest.raises(ConfigError, match="boolean mask"):
        ManifestCropDataset(manifest, None, None, rows=[0, 1])
    with pytest.raises(DataError, match="no images"):
        ManifestCropDataset(manifest, None, None, rows=np.zeros(len(mask), dtype=bool))


def test_unreadable_manifest_image_names_row_and_file(manifest, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    frame = manifest.frame.copy()
    frame.loc[0, "path"] = str(broken)
    broken_manifest = type(manifest)(frame=frame, root=manifest.root, meta=manifest.meta)
    dataset = ManifestCropDataset(broken_manifest, None, None)
    with pytest.raises(DataError, match="broken.png") as info:
        dataset[0]
    assert "image_id '00'" in str(info.value)


def test_image_list_unreadable_file_raises_or_is_reported(dataset_dir, tmp_path):
    root, _ = dataset_dir
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    missing = tmp_path / "missing.png"
    good = root / "img/photo.jpg"
    with pytest.raises(DataError, match="bad.jpg"):
        ImageListDataset([good, bad])[1]
    with pytest.raises(DataError, match="missing.png"):
        ImageListDataset([missing])[0]

    reported = ImageListDataset([good, bad, missing], on_error="report")
    items = [reported[i] for i in range(3)]
    assert items[0]["error"] is None and items[0]["image"].shape == (9, 3, S, S)
    assert "bad.jpg" in items[1]["error"] and items[1]["image"].shape == (0, 3, S, S)
    assert items[1]["image"].dtype == torch.uint8  # same dtype as a good item: the batch is not mixed
    assert "missing.png" in items[2]["error"]
    batches = list(make_loader(reported, batch_size=3, workers=0))
    assert batches[0]["image"].shape[0] == 9 and batches[0]["crop_index"].unique().tolist() == [0]
    assert [e is None for e in batches[0]["error"]] == [True, False, False]
    with pytest.raises(ConfigError, match="on_error"):
        ImageListDataset([good], on_error="skip")


@pytest.mark.parametrize("kwargs, name", [
    ({"crop_size": 0}, "crop_size"), ({"n_crops": 2.5}, "n_crops"), ({"test_grid": "3by3"}, "test_grid"),
    ({"resize": "short_side=abc"}, "resize"), ({"resize": (512,)}, "resize"), ({"std": (1, 0, 1)}, "std"),
    ({"mean": (0.5, 0.5)}, "mean"), ({"dtype": "float16"}, "dtype"),
])
def test_bad_crop_config_names_the_parameter(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        CropConfig(**kwargs)


def both_dtypes(manifest, **kw) -> tuple[ManifestCropDataset, ManifestCropDataset]:
    config = kw.pop("config")
    return (all_rows(manifest, config=config, **kw),
            all_rows(manifest, config=replace(config, dtype="float32"), **kw))


@pytest.mark.parametrize("train", [True, False])
def test_uint8_crops_equal_the_float_crops_after_normalisation(manifest, train):
    uint8, float32 = both_dtypes(manifest, config=CropConfig(n_crops=4, test_grid=(2, 2)), train=train, seed=5)
    uint8.set_epoch(2)
    float32.set_epoch(2)
    scale, shift = pixel_affine(IMAGENET_MEAN, IMAGENET_STD)
    for index in (0, 3, N_IMAGES):  # N_IMAGES: the JPEG
        raw, ref = uint8[index]["image"], float32[index]["image"]
        assert raw.dtype == torch.uint8 and channels_last(raw) and ref.dtype == torch.float32
        normalised = normalise_uint8(raw, scale, shift)
        assert normalised.is_contiguous() and normalised.dtype == torch.float32
        in_channels_last = normalise_uint8(raw, scale, shift, torch.channels_last)  # the GPU model's layout
        assert channels_last(in_channels_last) and torch.equal(in_channels_last, normalised)
        assert torch.allclose(normalised, ref, rtol=0, atol=1e-6)
        assert np.array_equal(to_pixels(raw), to_pixels(ref))  # the same windows and flips


def test_uint8_crops_are_the_same_per_seed_and_differ_across_seeds(manifest):
    a, b = (all_rows(manifest, config=CropConfig(n_crops=4), train=True, seed=7) for _ in range(2))
    other = all_rows(manifest, config=CropConfig(n_crops=4), train=True, seed=8)
    assert torch.equal(a[5]["image"], b[5]["image"]) and not torch.equal(a[5]["image"], other[5]["image"])
    pixels = png_pixels(a, 5)
    assert all(window_of(c, pixels) for c in to_pixels(a[5]["image"]))


def test_float32_batches_stay_contiguous_and_workers_agree(manifest):
    _, float32 = both_dtypes(manifest, config=CropConfig(test_grid=(1, 2)))
    serial = next(iter(make_loader(float32, batch_size=3, workers=0)))["image"]
    parallel = next(iter(make_loader(float32, batch_size=3, workers=2)))["image"]
    assert serial.dtype == torch.float32 and serial.is_contiguous() and parallel.is_contiguous()
    assert torch.equal(serial, parallel)


def test_a_batch_mixing_uint8_and_float_crops_is_refused(manifest):
    uint8, float32 = both_dtypes(manifest, config=CropConfig(test_grid=1))
    with pytest.raises(ConfigError, match="mixing crop dtypes.*CropConfig.dtype"):
        collate_crops([uint8[0], float32[1]])
