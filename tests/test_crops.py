"""qfm.data.crops, the torch-free crop math: its test-grid crops are the torch dataset's to the byte (sizes,
modes, resize, reduced decode), they sit where the grid says, and per-image averaging is the plain mean/std."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qfm.data.crops import CropConfig, cut_crops, decode, grid_crops, per_image_stats
from qfm.data.torch_dataset import ImageListDataset, per_image
from qfm.errors import DataError


def smooth_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random picture (noise upsampled), so that JPEG and resizing keep it close."""
    noise = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return np.array(Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def real_images(tmp_path_factory) -> list[Path]:
    """Image files of several sizes, formats and PIL modes (RGB, L, RGBA, P, CMYK, 16-bit I;16)."""
    folder = tmp_path_factory.mktemp("crops")
    pictures = {
        "rgb.png": Image.fromarray(smooth_rgb(300, 260, 0)),
        "gray.png": Image.fromarray(smooth_rgb(257, 331, 1)[..., 0]),  # mode L, taller than wide
        "rgba.png": Image.fromarray(smooth_rgb(240, 240, 2)).convert("RGBA"),
        "palette.png": Image.fromarray(smooth_rgb(400, 230, 3)).convert("P"),
        "small.png": Image.fromarray(smooth_rgb(120, 100, 4)),  # below the crop size: scaled up
        "large.jpg": Image.fromarray(smooth_rgb(1600, 1200, 5)),  # reduced decode applies with a resize
        "cmyk.jpg": Image.fromarray(smooth_rgb(500, 375, 6)).convert("CMYK"),
        "deep.png": Image.fromarray(smooth_rgb(260, 250, 7)[..., 1].astype(np.uint16) * 257),  # mode I;16
    }
    paths = []
    for name, picture in pictures.items():
        picture.save(folder / name, **({"quality": 92} if name.endswith(".jpg") else {}))
        paths.append(folder / name)
    return paths


CONFIGS = {
    "3x3": CropConfig(),
    "count 5, 96 px": CropConfig(crop_size=96, test_grid=5),
    "1x2, 96 px": CropConfig(crop_size=96, test_grid="1x2"),
    "resize 320x240": CropConfig(crop_size=128, test_grid=(2, 2), resize=(320, 240)),
    "short side 256": CropConfig(crop_size=160, test_grid=(2, 3), resize="short_side=256"),
    "short side 256, reduced decode": CropConfig(crop_size=160, test_grid=(2, 3), resize="short_side=256",
                                                 reduced_decode=True),
    "float32 config": CropConfig(crop_size=96, test_grid=(2, 2), dtype="float32"),
    "1x2 and mirrored, 96 px": CropConfig(crop_size=96, test_grid="1x2", test_flip=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grid_crops_equal_the_torch_datasets_test_crops(real_images, name):
    config = CONFIGS[name]
    uint8 = replace(config, dtype="uint8")  # the torch dataset's raw crops (float32 ones are normalised)
    expected = ImageListDataset(real_images, uint8, train=False)
    for i, path in enumerate(real_images):
        crops = grid_crops(decode(path, config, f"image {i}"), config)
        assert crops.dtype == np.uint8 and crops.flags.c_contiguous
        assert crops.shape == (config.n_test_crops, config.crop_size, config.crop_size, 3), path.name
        assert np.array_equal(crops, expected[i]["image"].permute(0, 2, 3, 1).numpy()), (name, path.name)


def test_reduced_decode_changes_the_pixels_of_a_large_jpeg_only(real_images):
    """The setting matters (so the comparison above covers two different decodes), and only for the JPEG."""
    full, reduced = CONFIGS["short side 256"], CONFIGS["short side 256, reduced decode"]
    for path in real_images:
        same = np.array_equal(grid_crops(decode(path, full, "x"), full), grid_crops(decode(path, reduced, "x"), reduced))
        assert same == (path.name != "large.jpg"), path.name


def test_crops_sit_at_the_grid_positions_and_flip_whole_pixels():
    """On a picture whose pixels say where they are, each crop starts at its grid position."""
    height, width, size = 70, 90, 32
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x, y, x + y], axis=-1).astype(np.uint8)
    config = CropConfig(crop_size=size, test_grid=(2, 3))
    crops = grid_crops(Image.fromarray(pixels), config)
    assert config.grid_positions(width, height) == [(0, 0), (0, 29), (0, 58), (38, 0), (38, 29), (38, 58)]
    for crop, (top, left) in zip(crops, config.grid_positions(width, height)):
        assert np.array_equal(crop, pixels[top:top + size, left:left + size])
    flipped = cut_crops(pixels, [(5, 7, True)], size)[0]
    assert np.array_equal(flipped, pixels[5:5 + size, 7:7 + size][:, ::-1])
    mirrored = replace(config, test_flip=True)
    both = grid_crops(Image.fromarray(pixels), mirrored)
    assert mirrored.n_test_crops == 12 and len(both) == 12
    assert np.array_equal(both[:6], crops) and np.array_equal(both[6:], crops[:, :, ::-1])


def test_decode_names_the_file_and_what_it_is(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"^entry 3: cannot decode image .*junk.png .*; replace or remove it$"):
        decode(junk, CropConfig(), "entry 3")
    with pytest.raises(DataError, match=r"^entry 4: image file .*gone.png does not exist; check the dataset root"):
        decode(tmp_path / "gone.png", CropConfig(), "entry 4")


def test_per_image_stats_are_the_mean_and_population_std_of_each_images_crops():
    rng = np.random.default_rng(0)
    values = rng.random(40).astype(np.float32)
    owners = rng.permutation(np.repeat([7, 2, 9, 4], [1, 9, 20, 10]))  # unsorted, one image with one crop
    index, mean, std = per_image_stats(values, owners)
    assert index.tolist() == [2, 4, 7, 9] and mean.dtype == std.dtype == np.float64
    for i, owner in enumerate(index):
        own = values[owners == owner].astype(np.float64)
        assert mean[i] == pytest.approx(own.mean(), abs=1e-15) and std[i] == pytest.approx(own.std(), abs=1e-15)
    assert std[index.tolist().index(7)] == 0.0
    as_tensors = per_image(torch.from_numpy(values), torch.from_numpy(owners))  # the torch loader's wrapper
    assert all(np.array_equal(t.numpy(), a) for t, a in zip(as_tensors, (index, mean, std)))


def test_the_crop_module_imports_no_torch():
    script = ("import sys; sys.modules['torch'] = None\n"
              "import qfm.data.crops, qfm.inference, qfm.onnx_engine, qfm.steps.score\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm')))")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['torch']"  # only the blocking entry itself
