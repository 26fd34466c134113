"""The distortions of the demo dataset and of the synthetic DLE pool: each a function of an RGB uint8 image,
a strength and a random generator, with its strength from the mildest level to the strongest."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

ArrayFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Distortion:
    """A distortion and its strength from the mildest level to the strongest."""

    name: str
    apply: ArrayFn
    mild: float
    strong: float
    unit: str
    geometric: bool = True

    def strengths(self, n_levels: int) -> list[float]:
        steps = np.linspace(0.0, 1.0, n_levels)
        if self.geometric:
            values = self.mild * (self.strong / self.mild) ** steps
        else:
            values = self.mild + (self.strong - self.mild) * steps
        return [round(float(v), 4) for v in values]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _blur(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return _to_uint8(gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0)))


def _noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(img + rng.normal(0.0, sigma, img.shape))


def _jpeg(img: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=round(quality))
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _contrast(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mean = img.astype(np.float64).mean()
    return _to_uint8((img - mean) * factor + mean)


def _pixelate(img: np.ndarray, block: float, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[1], img.shape[0]
    small = Image.fromarray(img).resize((max(1, round(size[0] / block)), max(1, round(size[1] / block))),
                                        Image.Resampling.BOX)
    return np.asarray(small.resize(size, Image.Resampling.NEAREST))


def _salt_pepper(img: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    hit = rng.random(img.shape[:2]) < fraction
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255)[:, None].astype(np.uint8)
    return out


def _brightness(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(img.astype(np.float32) * factor)


def _down_up(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[1], img.shape[0]
    small = Image.fromarray(img).resize((round(size[0] / factor), round(size[1] / factor)),
                                        Image.Resampling.BICUBIC)
    return np.asarray(small.resize(size, Image.Resampling.BICUBIC))


DISTORTIONS = {d.name: d for d in (
    Distortion("blur", _blur, 0.7, 6.0, "Gaussian sigma (px)"),
    Distortion("noise", _noise, 4.0, 40.0, "Gaussian noise sigma (of 255)"),
    Distortion("jpeg", _jpeg, 40.0, 5.0, "JPEG quality"),
    Distortion("contrast", _contrast, 0.7, 0.15, "contrast factor about the mean"),
)}
POOL_DISTORTIONS = {d.name: d for d in (
    Distortion("pixelate", _pixelate, 2.0, 8.0, "block size (px)"),
    Distortion("saltpepper", _salt_pepper, 0.01, 0.08, "fraction of pixels"),
    Distortion("brightness", _brightness, 1.3, 2.0, "brightness gain (clipped)"),
    Distortion("downscale", _down_up, 2.0, 6.0, "down- then up-scaling factor (bicubic)"),
)}
