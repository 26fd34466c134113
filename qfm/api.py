"""The Python API: score photos in a few lines, with the packaged model or one you trained.

    import qfm
    model = qfm.load()                      # the pretrained model in the package; engine="onnxruntime" too
    model.score("photo.jpg")                # 0-1, higher is better
    model.mos(pil_image)                    # on the training set's scale (0-100 for the packaged model)
    model.score([path, pil_image, array])   # several: a numpy array of scores
    model.table(paths)                      # a pandas table: path, score, mos, mos_scale, crop_std

An image is a file path, a PIL image or a numpy array (H, W, 3) RGB (uint8 0-255, or float 0-1; (H, W) is
grey). Every image gets the deterministic multi-crop test of `qfm score` (qfm.data.crops): the same crops,
the same mean. The onnxruntime engine imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qfm.data.crops import CropConfig, decode, grid_crops, positive_int
from qfm.errors import ConfigError, DataError
from qfm.packaged import ENGINES, model_scale, packaged_model, scale_label, to_mos, with_mos

ImageLike = Any  # str | Path | PIL.Image.Image | np.ndarray


class _TorchCrops:
    """uint8 crops (N, S, S, 3) -> scores (N,) through a torch model (normalised inside the model)."""

    def __init__(self, model, device) -> None:
        self.model, self.device = model, device

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        import torch

        from qfm.train.engine import autocast

        with torch.no_grad(), autocast(self.device, True):
            batch = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)
            return self.model(batch).float().cpu().numpy()


def to_pil(image: ImageLike, config: CropConfig, what: str = "image"):
    """A PIL RGB image from a path, a PIL image or a numpy array; a DataError naming `what` otherwise."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        return decode(image, config, what)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
            raise DataError(f"{what}: a numpy image must be (H, W, 3) RGB or (H, W) grey, got shape "
                            f"{array.shape}; move the channels last (e.g. array.transpose(1, 2, 0))")
        if array.dtype == np.uint8:
            pixels = array
        elif np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise DataError(f"{what}: a float image must hold values in [0, 1]; pass uint8 for 0-255")
            pixels = np.round(array * 255).astype(np.uint8)
        else:
            raise DataError(f"{what}: a numpy image must be uint8 (0-255) or float (0-1), got {array.dtype}")
        image = Image.fromarray(np.ascontiguousarray(pixels))
        return image.convert("RGB")
    raise DataError(f"{what}: cannot score a {type(image).__name__}; pass a file path, a PIL image or a numpy "
                    "array (H, W, 3)")


class QualityModel:
    """A loaded model: `score` ([0, 1], higher is better), `mos` (the training set's scale, when the model
    records it) and `table`. Make one with qfm.load()."""

    def __init__(self, scorer, state: dict, engine: str, scale: dict | None, dataset: str = "",
                 source: str = "") -> None:
        self._scorer, self.state, self.engine = scorer, state, engine
        self.config = CropConfig(**state["crop"])
        self.scale, self.dataset, self.source = scale, dataset, source

    def __repr__(self) -> str:
        scale = scale_label(self.scale, self.dataset) if self.scale else "no MOS scale recorded"
        return f"QualityModel({self.source!r}, engine={self.engine!r}, mos: {scale})"

    @property
    def scale_label(self) -> str | None:
        """The `mos` scale in words, e.g. 'MOS 0-100 of livec, higher is better' (None when unknown)."""
        return scale_label(self.scale, self.dataset) if self.scale else None

    def _predict(self, images: Sequence[ImageLike], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        batch_size = positive_int(batch_size, "batch_size")
        means, spreads = [], []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            crops = [grid_crops(to_pil(img, self.config, f"image {start + i}"), self.config)
                     for i, img in enumerate(chunk)]
            scores = np.asarray(self._scorer(np.concatenate(crops)), dtype=np.float64).reshape(-1)
            bounds = np.cumsum([0] + [len(c) for c in crops])
            for a, b in pairwise(bounds):
                means.append(scores[a:b].mean())
                spreads.append(scores[a:b].std())
        return np.array(means), np.array(spreads)

    @staticmethod
    def _many(images) -> tuple[list, bool]:
        """(a list of images, whether one image was given)."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images), False
        if isinstance(images, (list, tuple)):
            return list(images), False
        return [images], True

    def score(self, images: ImageLike | Sequence[ImageLike], *, batch_size: int = 16) -> float | np.ndarray:
        """The score in [0, 1] (higher is better): a float for one image, an array for a list (or an
        (N, H, W, 3) array)."""
        items, single = self._many(images)
        if not items:
            return np.zeros(0)
        mean, _ = self._predict(items, batch_size)
        return float(mean[0]) if single else mean

    def mos(self, images: ImageLike | Sequence[ImageLike], *, batch_size: int = 16) -> float | np.ndarray:
        """The score on the training set's scale (self.scale_label), e.g. 0-100 for the packaged model."""
        if self.scale is None:
            raise ConfigError(f"{self.source} records no training score scale (final.json or pretrained.json); "
                              "use score(), which is in [0, 1]")
        value = to_mos(self.score(images, batch_size=batch_size), self.scale)
        return float(value) if np.ndim(value) == 0 else value

    def table(self, images: Sequence[ImageLike], *, batch_size: int = 16) -> pd.DataFrame:
        """One row per image, in order: path (or '<PIL image>' / '<array>'), score, mos and mos_scale (when
        the scale is known), crop_std."""
        items, _ = self._many(images)
        mean, spread = self._predict(items, batch_size)
        names = [str(i) if isinstance(i, (str, Path)) else f"<{type(i).__name__}>" for i in items]
        frame = pd.DataFrame({"path": names, "score": mean, "crop_std": spread})
        return with_mos(frame, self.scale, self.dataset) if self.scale else frame


def load(model: str | Path | None = None, *, engine: str = "torch", device: str = "auto") -> QualityModel:
    """A model to score with: the pretrained model packaged with qfm (model None), or a trained model folder,
    a best.safetensors, a registered model (models:/NAME@ALIAS; torch) or a .onnx export (onnxruntime).
    engine: 'torch' or 'onnxruntime' (CPU, no torch imported). device: the torch engine's ('auto', 'cpu',
    'cuda')."""
    from qfm.inference import load_engine_model

    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; known engines: {', '.join(ENGINES)}")
    ref = packaged_model(engine) if model is None else model
    loaded, state, device = load_engine_model(ref, engine, device)
    if engine == "torch":
        from qfm.runtime import resolve_device

        scorer = _TorchCrops(loaded, resolve_device(device))
    else:
        scorer = loaded
    found = model_scale(None if model is None else model)
    scale, dataset = found if found else (None, "")
    return QualityModel(scorer, state, engine, scale, dataset, source="packaged" if model is None else str(model))


create_metric = load  # the name IQA-PyTorch uses
