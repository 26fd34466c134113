"""The torch datasets: each image is decoded once per visit, then cut into K crops.

Training items get K random crops (random positions, random horizontal flip) from a generator seeded by
(seed, epoch, index), so an epoch is reproducible whatever the number of workers. Test items get a fixed
grid of crops that always includes the four corners (for grids of 2x2 or more), so the same image always
gets the same crops and the same score. The collate function flattens the crops of a batch into one
(N, 3, S, S) tensor and keeps, per crop, the index of its image so predictions can be averaged back.

Crops are uint8 RGB in channels-last memory by default (``CropConfig.dtype``): a (K, 3, S, S) tensor whose
memory is (K, S, S, 3), cut from the decoded image without conversion. The model converts them to float
and normalises them on its own device with its own mean/std (``QfmIqm.prepare``). ``dtype='float32'``
gives crops normalised in the worker with ``CropConfig.mean/std`` instead (DEIQT's way, 4x the bytes).
The crop settings, decoding, crop cutting and per-image averaging are qfm.data.crops' (numpy, no torch),
shared with the onnxruntime scorer.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from qfm.data.crops import (  # noqa: F401  (IMAGENET_MEAN/STD: still imported from here)
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropConfig,
    cut_crops,
    decode,
    grid_boxes,
    per_image_stats,
    positive_int,
    resized_pixels,
)
from qfm.data.manifest import Manifest
from qfm.data.splits import part_mask
from qfm.errors import ConfigError, DataError

ON_ERROR = ("raise", "report")
DEFAULT_CROP = CropConfig()  # the datasets' default crop settings (frozen)


class _CropDataset(Dataset):
    """Shared by both datasets: decode, resize, crop (and normalise float32 crops); the epoch lives in
    shared memory."""

    def __init__(self, config: CropConfig, train: bool, seed: int) -> None:
        if not isinstance(config, CropConfig):
            raise ConfigError(f"config must be a CropConfig, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.config = config
        self.train = bool(train)
        self.seed = int(seed)
        std = np.array(config.std, dtype=np.float32).reshape(3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._shift = (np.array(config.mean, dtype=np.float32).reshape(3, 1, 1) / std).astype(np.float32)
        # Shared memory, so that set_epoch reaches DataLoader workers that persist across epochs.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the training crops of this epoch; call it before iterating the loader."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch.fill_(int(epoch))

    @property
    def crops_per_item(self) -> int:
        return self.config.n_crops if self.train else self.config.n_test_crops

    @staticmethod
    def _check_index(index: int, length: int) -> int:
        index = operator.index(index)
        if not 0 <= index < length:
            raise IndexError(f"index {index} is out of range for a dataset of {length} images")
        return index

    def empty_crops(self) -> torch.Tensor:
        """(0, 3, S, S) in this config's dtype and layout: the crops of an image that could not be read."""
        s = self.config.crop_size
        if self.config.dtype == "uint8":
            return torch.empty((0, s, s, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        return torch.empty((0, 3, s, s), dtype=torch.float32)

    def crops(self, image: Image.Image, index: int) -> torch.Tensor:
        """(K, 3, S, S) crops of one decoded image: random (train) or the fixed grid (test).

        uint8: the pixels as decoded, memory (K, S, S, 3) (channels-last). float32: normalised, contiguous.
        """
        cfg, s = self.config, self.config.crop_size
        pixels = resized_pixels(image, cfg)  # (H, W, 3) uint8
        if self.train:
            height, width = pixels.shape[:2]
            rng = np.random.default_rng([self.seed, self.epoch, index])
            tops = rng.integers(0, height - s + 1, size=cfg.n_crops)
            lefts = rng.integers(0, width - s + 1, size=cfg.n_crops)
            flips = (rng.random(cfg.n_crops) < 0.5) & cfg.hflip
            boxes = list(zip(tops, lefts, flips))
        else:
            boxes = grid_boxes(pixels, cfg)
        if cfg.dtype == "uint8":  # (K, 3, S, S) view of (K, S, S, 3) memory
            return torch.from_numpy(cut_crops(pixels, boxes, s)).permute(0, 3, 1, 2)
        out = np.empty((len(boxes), 3, s, s), dtype=np.float32)
        for k, (top, left, flip) in enumerate(boxes):
            patch = pixels[top:top + s, left:left + s]
            out[k] = (patch[:, ::-1] if flip else patch).transpose(2, 0, 1)  # uint8 -> float32
        out *= self._scale
        out -= self._shift
        return torch.from_numpy(out)


class ManifestCropDataset(_CropDataset):
    """Scored images of one part of one split of a manifest; one item = one image's K crops.

    Rows are the manifest rows where ``split == part`` (part None: every row, split is then ignored),
    further restricted by ``rows`` (a boolean mask over the manifest's rows) when given. An item is
    {'image': (K, 3, S, S) crops (see CropConfig.dtype), 'mos': float32 scalar, 'index': position in this dataset,
    'image_id': str}; ``row_positions[index]`` is the image's row in ``manifest.frame``.
    """

    def __init__(self, manifest: Manifest, split: str | None, part: str | None,
                 config: CropConfig = DEFAULT_CROP, train: bool = False, seed: int = 0,
                 rows: Sequence[bool] | np.ndarray | pd.Series | None = None) -> None:
        super().__init__(config, train, seed)
        frame = manifest.frame
        mask = np.ones(len(frame), dtype=bool)
        if part is not None:
            if split is None:
                raise ConfigError(f"part '{part}' needs a split column (one of {manifest.split_columns})")
            mask &= part_mask(frame, split, part).to_numpy(dtype=bool, na_value=False)
        if rows is not None:
            rows = np.asarray(rows)
            if rows.dtype != bool or rows.shape != (len(frame),):
                raise ConfigError(f"rows must be a boolean mask, one entry per manifest row ({len(frame)}), "
                                  f"got dtype {rows.dtype} and shape {rows.shape}")
            mask &= rows
        self.row_positions = np.flatnonzero(mask)
        self.split, self.part = split, part
        dataset = manifest.meta.get("dataset", "?")
        if len(self.row_positions) == 0:
            where = f"part '{part}' of {split}" if part is not None else "the selected rows"
            raise DataError(f"manifest of dataset '{dataset}' has no images in {where}: nothing to load")
        selected = frame.iloc[self.row_positions]
        self.image_ids = [str(i) for i in selected["image_id"]]
        self.paths = [manifest.image_path(str(p)) for p in selected["path"]]
        self.mos = selected["mos"].to_numpy(dtype=np.float32)
        self.dataset_name = dataset

    def __len__(self) -> int:
        return len(self.row_positions)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index, len(self))
        what = (f"manifest of '{self.dataset_name}', row {self.row_positions[index]} "
                f"(image_id '{self.image_ids[index]}')")
        image = decode(self.paths[index], self.config, what)
        return {"image": self.crops(image, index), "mos": torch.tensor(self.mos[index]), "index": index,
                "image_id": self.image_ids[index]}


class ImageListDataset(_CropDataset):
    """Unscored image files (the unlabelled pool, `qfm score`); test grid unless train=True.

    An item is {'image': (K, 3, S, S), 'index', 'image_id': the path as given, 'error': None}. An
    unreadable file raises a DataError naming it; with on_error='report' its item instead has
    'error' set to the reason and an image with 0 crops, so the caller can list it.
    """

    def __init__(self, paths: Iterable[str | Path], config: CropConfig = DEFAULT_CROP, train: bool = False,
                 seed: int = 0, on_error: str = "raise") -> None:
        super().__init__(config, train, seed)
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
        self.on_error = on_error
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataError("no image files given: the list of paths is empty")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index, len(self))
        path = self.paths[index]
        item = {"index": index, "image_id": str(path), "error": None}
        try:
            image = decode(path, self.config, f"image list entry {index}")
        except DataError as exc:
            if self.on_error == "raise":
                raise
            return item | {"image": self.empty_crops(), "error": str(exc)}
        return item | {"image": self.crops(image, index)}


def collate_crops(items: list[dict]) -> dict:
    """Flatten B items of K crops into one batch.

    Returns {'image': (N, 3, S, S) with N the total number of crops, 'crop_index': (N,) the dataset index
    of each crop's image, 'index': (B,), 'n_crops': (B,), 'image_id': list}, plus 'mos': (B,) for scored
    items and 'error': list (None where the image decoded) for ImageListDataset items. The crops keep
    their dtype and layout: uint8 stays channels-last (memory (N, S, S, 3)), float32 stays contiguous.
    Items of both dtypes in one batch are a ConfigError.
    """
    if not items:
        raise ValueError("collate_crops got an empty batch")
    dtypes = {item["image"].dtype for item in items}
    if len(dtypes) > 1:
        ids = {str(item["image"].dtype): item["image_id"] for item in items}
        raise ConfigError(f"collate_crops got a batch mixing crop dtypes {sorted(ids)} (e.g. images {ids}): "
                          "the items come from datasets with different CropConfig.dtype; use one dtype")
    uint8 = dtypes == {torch.uint8}
    # uint8 crops are batched as their (K, S, S, 3) memory: torch.stack/default_collate of channels-last
    # crops would write a contiguous (N, 3, S, S) tensor, a transposing copy that loses the layout.
    blocks = [item["image"].permute(0, 2, 3, 1).contiguous() if uint8 else item["image"] for item in items]
    counts = np.array([block.shape[0] for block in blocks], dtype=np.int64)
    index = np.array([item["index"] for item in items], dtype=np.int64)
    if get_worker_info() is not None and counts.sum() > 0:
        # In a worker, default_collate stacks straight into shared memory, saving a copy on the way back.
        image = default_collate([crop for block in blocks for crop in block.unbind(0)])
    else:  # numpy: single-threaded, unlike torch.cat/stack, whose thread pool crawls on a busy machine
        image = torch.from_numpy(np.concatenate([block.numpy() for block in blocks]))
    batch = {"image": image.permute(0, 3, 1, 2) if uint8 else image,
             # np.repeat: torch.repeat_interleave took 8 ms a call with 2 threads on a busy machine (4 us on 1)
             "crop_index": torch.from_numpy(np.repeat(index, counts)), "index": torch.from_numpy(index),
             "n_crops": torch.from_numpy(counts), "image_id": [item["image_id"] for item in items]}
    if "mos" in items[0]:
        batch["mos"] = torch.stack([item["mos"] for item in items])
    if "error" in items[0]:
        batch["error"] = [item["error"] for item in items]
    return batch


def per_image(values: torch.Tensor, crop_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-crop values (N,) back to per-image (index, mean, std over crops) as tensors; std is 0 for one crop
    (qfm.data.crops.per_image_stats, which the onnxruntime scorer uses too)."""
    values = values.detach().reshape(-1).to(torch.float64).cpu().numpy()
    return tuple(map(torch.from_numpy, per_image_stats(values, crop_index.reshape(-1).cpu().numpy())))


def make_loader(dataset: Dataset, batch_size: int = 8, workers: int = 0, shuffle: bool = False, *,
                batch_sampler: Sampler | Iterable | None = None, drop_last: bool = False, seed: int = 0,
                pin_memory: bool = False, prefetch_factor: int | None = None) -> DataLoader:
    """A DataLoader over a crop dataset with collate_crops; batch_size counts images, not crops.

    Workers persist across epochs when workers > 0 (set_epoch still reaches them). shuffle draws the
    order from a generator seeded with ``seed``. ``batch_sampler`` (yielding lists of dataset indices)
    replaces batch_size, shuffle and drop_last.
    """
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ConfigError(f"workers must be a non-negative integer, got {workers!r}")
    kwargs: dict = {"num_workers": workers, "collate_fn": collate_crops, "pin_memory": pin_memory,
                    "persistent_workers": workers > 0}
    if prefetch_factor is not None:
        if workers == 0:
            raise ConfigError("prefetch_factor needs workers > 0")
        kwargs["prefetch_factor"] = positive_int(prefetch_factor, "prefetch_factor")
    if batch_sampler is not None:
        if shuffle or drop_last:
            raise ConfigError("with a batch_sampler, the sampler decides order and batch size: "
                              "pass shuffle=False and drop_last=False")
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=positive_int(batch_size, "batch_size"), shuffle=shuffle,
                      drop_last=drop_last, generator=generator, **kwargs)
