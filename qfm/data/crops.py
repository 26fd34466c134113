"""Crop settings and the deterministic multi-crop test, in numpy only (no torch).

``CropConfig`` says how an image becomes crops; ``decode`` reads an image as a config asks; ``cut_crops``
cuts square uint8 crops out of its pixels; ``grid_crops`` gives an image's fixed test-grid crops; and
``per_image_stats`` averages per-crop scores back to one mean and std per image. The torch dataset
(qfm.data.torch_dataset) and the onnxruntime scorer (qfm.inference) both cut and average through here, so
an image gets the same crops and the same score on either engine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qfm.data import images
from qfm.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = ("uint8", "float32")
RESIZE_FORMS = "None, [width, height], 'WIDTHxHEIGHT' or 'short_side=N'"


def positive_int(value, name: str) -> int:
    """value as an int if it is a positive integer (not a bool), else a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _parse_pair(value, name: str, what: str) -> tuple[int, int]:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if not match:
            raise ConfigError(f"{name} '{value}' is not of the form {what}")
        value = (int(match.group(1)), int(match.group(2)))
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"{name} must be a pair {what}, got {value!r}")
    return positive_int(value[0], name), positive_int(value[1], name)


def _parse_resize(value) -> tuple[int, int] | str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().lower().startswith("short_side"):
        match = re.fullmatch(r"\s*short_side\s*=\s*(\d+)\s*", value.lower())
        if not match or int(match.group(1)) < 1:
            raise ConfigError(f"resize '{value}' is not valid; use one of {RESIZE_FORMS}")
        return f"short_side={int(match.group(1))}"
    try:
        return _parse_pair(value, "resize", "(width, height)")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; resize takes one of {RESIZE_FORMS}") from None


def _parse_triple(value, name: str) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3:
        raise ConfigError(f"{name} must be three numbers (one per RGB channel), got {value!r}")
    return triple  # type: ignore[return-value]


def _spread(count: int, room: int) -> list[int]:
    """count offsets evenly spread over [0, room]: the ends included, or the centre for one."""
    if count == 1:
        return [room // 2]
    return [round(i * room / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class CropConfig:
    """How an image becomes crops.

    crop_size: side S of the square crops. n_crops: K random crops per image and visit (training).
    test_grid: the fixed test crops, (rows, cols) or 'RxC' for a grid, or a count N laid out as
      round(sqrt(N)) rows sharing the N crops as evenly as possible; within a row the crops are evenly
      spread from the left edge to the right edge (one crop: centred). Default 3x3 = 9 crops, near
      DEIQT's 10 test crops per image but fixed, and covering the corners and the centre.
    resize: applied to the decoded image before cropping: None (keep the size), (width, height) such
      as (512, 384) for KonIQ-10k and SPAQ, or 'short_side=N' (keeps the aspect ratio).
      After that, an image whose shorter side is below crop_size is scaled up, keeping its aspect
      ratio, so that its shorter side equals crop_size. Resampling is bilinear (PIL, antialiased).
    mean/std: normalisation on [0, 1] pixel values; ImageNet's by default, or the model's own
      (see from_data_config). Applied in the worker only to float32 crops; training checks that they
      equal the model's (the model's data config is the one source). hflip: random horizontal flips.
    test_flip: each test-grid crop is also scored mirrored left-right (twice the test crops; the score
      is the mean over all of them). Off in older records.
    dtype: 'uint8' (default): raw RGB crops in channels-last memory, normalised by the model on its
      device; 'float32': crops normalised here with mean/std, contiguous (the DEIQT-style baseline).
    reduced_decode: with a resize, decode a JPEG at least twice the resized size at a reduced scale
      first (qfm.data.images.load_rgb); the pixels differ slightly from a full decode, so it is part of a
      model's recorded crop settings: training turns it on, and a record without it (older models) keeps it
      off. No effect without a resize.
    """

    crop_size: int = 224
    n_crops: int = 4
    test_grid: int | tuple[int, int] | str = (3, 3)
    resize: tuple[int, int] | str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hflip: bool = True
    dtype: str = "uint8"
    reduced_decode: bool = False
    test_flip: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "crop_size", positive_int(self.crop_size, "crop_size"))
        set_(self, "n_crops", positive_int(self.n_crops, "n_crops"))
        grid = self.test_grid
        if isinstance(grid, (str, tuple, list)):
            grid = _parse_pair(grid, "test_grid", "(rows, cols) or 'RxC'")
        else:
            grid = positive_int(grid, "test_grid")
        set_(self, "test_grid", grid)
        set_(self, "resize", _parse_resize(self.resize))
        set_(self, "mean", _parse_triple(self.mean, "mean"))
        std = _parse_triple(self.std, "std")
        if min(std) <= 0:
            raise ConfigError(f"std must be positive for every channel, got {std}")
        set_(self, "std", std)
        set_(self, "hflip", bool(self.hflip))
        set_(self, "reduced_decode", bool(self.reduced_decode))
        set_(self, "test_flip", bool(self.test_flip))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)} (uint8: raw crops the model normalises; "
                              f"float32: crops normalised in the loader), got {self.dtype!r}")

    @classmethod
    def from_data_config(cls, data_config: Mapping, **overrides) -> CropConfig:
        """Crop size, mean and std from a model's data config (timm's resolve_data_config dict)."""
        kwargs: dict = {}
        if "input_size" in data_config:
            _, height, width = data_config["input_size"]
            if height != width:
                raise ConfigError(f"the model's input_size {tuple(data_config['input_size'])} is not square; "
                                  "qfm crops are square: pass crop_size explicitly")
            kwargs["crop_size"] = int(height)
        for key in ("mean", "std"):
            if key in data_config:
                kwargs[key] = data_config[key]
        return cls(**(kwargs | overrides))

    @property
    def grid_rows(self) -> list[int]:
        """The number of test crops in each row of the grid, top to bottom."""
        if isinstance(self.test_grid, tuple):
            rows, cols = self.test_grid
            return [cols] * rows
        n = self.test_grid
        rows = max(1, round(math.sqrt(n)))
        base, extra = divmod(n, rows)
        return [base + (1 if r < extra else 0) for r in range(rows)]

    @property
    def n_test_crops(self) -> int:
        return sum(self.grid_rows) * (2 if self.test_flip else 1)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize policy and the scale-up of images smaller than a crop."""
        if isinstance(self.resize, tuple):
            width, height = self.resize
        elif isinstance(self.resize, str):
            side = int(self.resize.split("=")[1])
            scale = side / min(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        if min(width, height) < self.crop_size:
            scale = self.crop_size / min(width, height)
            width = max(self.crop_size, round(width * scale))
            height = max(self.crop_size, round(height * scale))
        return width, height

    def grid_positions(self, width: int, height: int) -> list[tuple[int, int]]:
        """(top, left) of each test crop in an image of this (already resized) size."""
        s = self.crop_size
        rows = self.grid_rows
        tops = _spread(len(rows), height - s)
        return [(top, left) for top, cols in zip(tops, rows) for left in _spread(cols, width - s)]


def decode(path: str | Path, config: CropConfig, what: str) -> Image.Image:
    """The image in RGB, decoded once (at reduced scale when the config asks); any failure is a DataError
    naming the file, prefixed with what (which entry of which list it is)."""
    reduce = config.reduced_decode and config.resize is not None
    try:
        return images.load_rgb(path, config.resized_size if reduce else None)
    except FileNotFoundError:
        raise DataError(f"{what}: image file {path} does not exist; check the dataset root") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{what}: cannot decode image {path} ({exc}); replace or remove it") from exc


def resized_pixels(image: Image.Image, config: CropConfig) -> np.ndarray:
    """The decoded image's (H, W, 3) uint8 pixels at the config's resized size (bilinear when resized)."""
    size = config.resized_size(*image.size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image)


def cut_crops(pixels: np.ndarray, boxes: Sequence[tuple[int, int, bool]], size: int) -> np.ndarray:
    """(K, S, S, 3) uint8 crops of (H, W, 3) pixels, one per (top, left, flip) box, flipped left-right
    where flip is set. numpy, single-threaded on purpose: torch's thread pool is slow on a busy machine."""
    raw = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    # One 3-byte item per pixel, so that a flip moves whole pixels: 2.3x faster than [:, ::-1] on
    # (H, W, 3) bytes (measured), the same result.
    pixel = np.dtype((np.void, 3))
    src, dst = np.ascontiguousarray(pixels).view(pixel)[..., 0], raw.view(pixel)[..., 0]
    for k, (top, left, flip) in enumerate(boxes):
        patch = src[top:top + size, left:left + size]
        dst[k] = patch[:, ::-1] if flip else patch
    return raw


def grid_boxes(pixels: np.ndarray, config: CropConfig) -> list[tuple[int, int, bool]]:
    """The (top, left, flip) boxes of the fixed test grid on resized pixels: flip False, then, with
    test_flip, each position again mirrored."""
    height, width = pixels.shape[:2]
    flips = (False, True) if config.test_flip else (False,)
    return [(top, left, flip) for flip in flips for top, left in config.grid_positions(width, height)]


def grid_crops(image: Image.Image, config: CropConfig) -> np.ndarray:
    """An image's fixed test-grid crops, (K, S, S, 3) uint8 RGB: what an exported model takes."""
    pixels = resized_pixels(image, config)
    return cut_crops(pixels, grid_boxes(pixels, config), config.crop_size)


def per_image_stats(values: np.ndarray, crop_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-crop values (N,) back to per-image (index, mean, std over crops), float64, sorted by index;
    std is the population std (0 for one crop)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    index, inverse = np.unique(np.asarray(crop_index).reshape(-1), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(index)).astype(np.float64)
    mean = np.bincount(inverse, weights=values, minlength=len(index)) / counts
    spread = np.bincount(inverse, weights=(values - mean[inverse]) ** 2, minlength=len(index)) / counts
    return index.astype(np.int64), mean, np.sqrt(spread)
