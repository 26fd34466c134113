"""The built-in demo dataset: procedural dead-leaves scenes and, optionally, photographs shipped inside
installed wheels, distorted and scored on the fly.

Synthetic, not human: a simulated opinion score, half from the distortion's level (each type's strengths
span just-visible to severe) and half from SSIM against the reference (how visible it is on this content):
MOS = 100 * (0.5 * (1 - impairment(level)) + 0.5 * SSIM(luma)). Layout:

  out_dir/images/<ref>_<distortion>_<level>.png   scored images (scores.csv: image, mos, ref, distortion, level)
  out_dir/pool/<ref>_<distortion>_<level>.png     unlabelled pool for DLE (pool.csv: image, content_id)
  out_dir/refs/<ref>.png                          the undistorted contents (photographs and scenes)
  out_dir/DEMO.md                                 what this is and how it was made

Paths in both CSVs are relative to out_dir. Deterministic for a seed; re-running into the same folder
rewrites the same bytes and removes images a previous run with other counts left behind. The contents are
made in parallel, one worker process per usable core (for ten contents or more); a content's images and scores depend only on the
seed and the content, and the tables are written in content order, so the bytes do not depend on the
number of processes.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from qfm.config import DemoParams
from qfm.data.dead_leaves import dead_leaves
from qfm.data.distortions import DISTORTIONS, POOL_DISTORTIONS, Distortion
from qfm.errors import ConfigError

SCORES_FILE = "scores.csv"
POOL_FILE = "pool.csv"
README_FILE = "DEMO.md"
IMAGES_DIR, POOL_DIR, REFS_DIR = "images", "pool", "refs"
MOS_MIN, MOS_MAX = 0.0, 100.0
LEVEL_WEIGHT = 0.5  # share of the score set by the level; the rest is SSIM against the reference
IMPAIRMENT_RANGE = (0.1, 0.8)  # impairment of the mildest and of the strongest level
SCORE_DESCRIPTION = (f"synthetic simulated opinion, not human: MOS = 100 * ({LEVEL_WEIGHT:g} * (1 - impairment) + "
                     f"{1 - LEVEL_WEIGHT:g} * SSIM(luma) against the reference), impairment rising linearly with "
                     f"the level from {IMPAIRMENT_RANGE[0]:g} to {IMPAIRMENT_RANGE[1]:g}")

# Real images that ship inside installed wheels (no download): scikit-image's, matplotlib's grace_hopper
# and scikit-learn's two sample photographs. PHOTOGRAPHS, natural scenes as in LIVE, CSIQ or KADID-10k,
# come first, so a small n_references takes those; the scientific images and document scans follow.
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "grace_hopper", "china", "flower",
               "camera", "coins", "moon", "brick", "grass", "gravel")
REFERENCES = (*PHOTOGRAPHS, "immunohistochemistry", "retina", "hubble_deep_field", "page", "text")

MAX_LEVELS = 8
MAX_SCENES = 999
DEFAULTS = DemoParams()
SCENE_PREFIX = "scene_"


def scene_name(index: int) -> str:
    """The content id of dead-leaves scene ``index``."""
    return f"{SCENE_PREFIX}{index:03d}"


def _plan(names: Sequence[str], n_levels: int, scene_index: int | None, table: dict[str, Distortion],
          offset: int = 0) -> list[tuple[int, Distortion, int, float]]:
    """(rng index, distortion, level, strength) to write for one content.

    A packaged reference gets every level of every distortion, so quality can be ranked within it. A scene
    gets each distortion once, at level (scene_index + distortion index) mod n_levels + 1: the levels are
    balanced over the scenes, and most of the scenes' contribution is comparisons across contents.
    """
    plan = []
    for name in names:
        distortion, d_index = table[name], offset + list(table).index(name)
        for level, strength in enumerate(distortion.strengths(n_levels) if n_levels else [], start=1):
            if scene_index is None or level == (scene_index + d_index - offset) % n_levels + 1:
                plan.append((d_index, distortion, level, strength))
    return plan


@dataclass(frozen=True)
class DemoSummary:
    """What make_demo wrote."""

    out_dir: Path
    seed: int
    references: tuple[str, ...]
    scenes: tuple[str, ...]
    distortions: tuple[str, ...]
    n_levels: int
    n_images: int
    n_pool: int
    mos_min: float
    mos_max: float

    def __str__(self) -> str:
        parts = [f"{len(self.scenes)} dead-leaves scenes (each distortion once)"] if self.scenes else []
        if self.references:
            parts.append(f"{len(self.references)} packaged images (every level of every distortion)")
        return (f"{self.n_images} scored images of {' and '.join(parts)}, {len(self.distortions)} distortions "
                f"at {self.n_levels} levels, {self.n_pool} pool images, "
                f"MOS {self.mos_min:.1f}-{self.mos_max:.1f}, seed {self.seed}")


def _read_packaged(name: str) -> np.ndarray:
    """The image as an array, from the wheel that ships it."""
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as file, Image.open(file) as image:
            return np.asarray(image.convert("RGB"))
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    from skimage import data

    return data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()


def load_reference(name: str, size: int = DEFAULTS.image_size) -> np.ndarray:
    """A packaged photograph, centre-cropped to a square and resized to size x size RGB uint8."""
    if name not in REFERENCES:
        raise ConfigError(f"unknown demo reference '{name}'; known: {', '.join(REFERENCES)}")
    image = _read_packaged(name)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side, :3]))
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS))


def impairment(level: int, n_levels: int) -> float:
    """The level's share of the score: IMPAIRMENT_RANGE spread linearly over levels 1..n_levels."""
    low, high = IMPAIRMENT_RANGE
    return low + (high - low) * (level - 1) / (n_levels - 1)


class _Scorer:
    """The simulated MOS of distorted images of one reference (its luma computed once)."""

    def __init__(self, reference: np.ndarray, n_levels: int) -> None:
        from skimage.color import rgb2gray

        self._gray, self._n_levels = rgb2gray(reference), n_levels

    def __call__(self, image: np.ndarray, level: int) -> float:
        from skimage.color import rgb2gray
        from skimage.metrics import structural_similarity

        ssim = structural_similarity(self._gray, rgb2gray(image), data_range=1.0, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False)
        opinion = 1.0 - impairment(level, self._n_levels)
        return round(MOS_MAX * (LEVEL_WEIGHT * opinion + (1.0 - LEVEL_WEIGHT) * max(0.0, float(ssim))), 3)


def _save_png(img: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "PNG", compress_level=1)
    data = buffer.getvalue()
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)


def _check_counts(n_references: int, n_scenes: int, n_levels: int, pool_levels: int, image_size: int,
                  distortions: Sequence[str]) -> None:
    if not 0 <= n_references <= len(REFERENCES):
        raise ConfigError(f"demo n_references must be 0..{len(REFERENCES)} (the packaged images: the first "
                          f"{len(PHOTOGRAPHS)} are natural photographs, the rest scientific images and scans), "
                          f"got {n_references}")
    if not 0 <= n_scenes <= MAX_SCENES:
        raise ConfigError(f"demo n_scenes must be 0..{MAX_SCENES} (procedural dead-leaves scenes), got {n_scenes}")
    if n_references + n_scenes < 2:
        raise ConfigError(f"the demo needs at least 2 contents (n_references + n_scenes), got "
                          f"{n_references} + {n_scenes}")
    if not 2 <= n_levels <= MAX_LEVELS:
        raise ConfigError(f"demo n_levels must be 2..{MAX_LEVELS}, got {n_levels}")
    if not 0 <= pool_levels <= MAX_LEVELS:
        raise ConfigError(f"demo pool_levels must be 0..{MAX_LEVELS} (0: no pool), got {pool_levels}")
    if image_size < 32:
        raise ConfigError(f"demo image_size must be at least 32 pixels, got {image_size}")
    unknown = [d for d in distortions if d not in DISTORTIONS]
    if unknown or not distortions or len(set(distortions)) != len(distortions):
        raise ConfigError(f"demo distortions {list(distortions)}: give each of {list(DISTORTIONS)} at most once"
                          f"{f' ({unknown} not known)' if unknown else ''}")


def _prepare_folder(out_dir: Path) -> None:
    """Refuse a non-empty folder that is not a demo dataset, so nothing of the user's is overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"demo output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / README_FILE).is_file():
        raise ConfigError(f"demo output folder {out_dir} is not empty and holds no {README_FILE}: it is not a "
                          "demo dataset; choose an empty or new folder")
    for sub in (IMAGES_DIR, POOL_DIR, REFS_DIR):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    if not (out_dir / README_FILE).is_file():  # the marker, so an interrupted run can be re-run here
        (out_dir / README_FILE).write_text("# QFM demo dataset (synthetic): being written by make_demo\n")


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete PNGs of an earlier run (other counts) that this run did not write."""
    for sub in (IMAGES_DIR, POOL_DIR, REFS_DIR):
        for path in (out_dir / sub).glob("*.png"):
            if f"{sub}/{path.name}" not in keep:
                path.unlink()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


@dataclass(frozen=True)
class _Job:
    """The settings every content is made with (sent to the worker processes)."""

    out_dir: Path
    seed: int
    n_levels: int
    pool_levels: int
    image_size: int
    distortions: tuple[str, ...]


def _make_content(job: _Job, name: str, index: int | None) -> tuple[list[list], list[list]]:
    """Write one content's reference, scored and pool images; return its scores.csv and pool.csv rows.

    ``index`` is the scene number, None for a packaged image. Every random draw is seeded by the content,
    so the result does not depend on which process makes it or in which order.
    """
    seed, out_dir = job.seed, job.out_dir
    if index is None:
        reference, rng_id = load_reference(name, job.image_size), REFERENCES.index(name)
    else:
        reference, rng_id = dead_leaves(job.image_size, (seed, index)), len(REFERENCES) + index
    _save_png(reference, out_dir / REFS_DIR / f"{name}.png")
    score = _Scorer(reference, job.n_levels)
    scored, pooled = [], []
    for d_index, distortion, level, strength in _plan(job.distortions, job.n_levels, index, DISTORTIONS):
        image = distortion.apply(reference, strength, np.random.default_rng([seed, rng_id, d_index, level]))
        relative = f"{IMAGES_DIR}/{name}_{distortion.name}_{level}.png"
        _save_png(image, out_dir / relative)
        scored.append([relative, f"{score(image, level):.3f}", name, distortion.name, level])
    for d_index, distortion, level, strength in _plan(tuple(POOL_DISTORTIONS), job.pool_levels, index,
                                                      POOL_DISTORTIONS, offset=len(DISTORTIONS)):
        relative = f"{POOL_DIR}/{name}_{distortion.name}_{level}.png"
        rng = np.random.default_rng([seed, rng_id, d_index, level])
        _save_png(distortion.apply(reference, strength, rng), out_dir / relative)
        pooled.append([relative, name])
    return scored, pooled


CONTENTS_PER_WORKER = 10  # a spawned worker costs about 1.5 s of imports: worth it from about 10 contents


def _n_workers(workers: int | None, n_contents: int) -> int:
    """The processes to use: ``workers``, or, when None, every usable core but no more than one per
    CONTENTS_PER_WORKER contents (a small demo is made in this process)."""
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cores, n_contents // CONTENTS_PER_WORKER)
    return max(1, min(workers, n_contents))


def _make_contents(job: _Job, contents: Sequence[tuple[str, int | None]], workers: int,
                   progress: bool) -> list[tuple[list[list], list[list]]]:
    """Each content's rows, in the order of ``contents``, made on ``workers`` processes (1: this one)."""
    with tqdm(total=len(contents), desc="demo contents", unit="content", disable=not progress) as bar:
        if workers == 1:
            results = []
            for name, index in contents:
                results.append(_make_content(job, name, index))
                bar.update()
            return results
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_make_content, job, name, index) for name, index in contents]
            try:
                for future in as_completed(futures):
                    future.result()  # raises a worker's error here
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
            return [future.result() for future in futures]


def make_demo(out_dir: Path, seed: int = DEFAULTS.seed, n_references: int = DEFAULTS.n_references,
              n_scenes: int = DEFAULTS.n_scenes, n_levels: int = DEFAULTS.n_levels,
              pool_levels: int = DEFAULTS.pool_levels, image_size: int = DEFAULTS.image_size,
              distortions: Sequence[str] = tuple(DISTORTIONS), progress: bool = True,
              workers: int | None = None) -> DemoSummary:
    """Write the demo dataset (scored images, unlabelled pool, references, DEMO.md) into out_dir.

    Defaults are those of the params schema's ``demo`` section (``qfm.config.DemoParams``).

    Scored: each packaged reference x distortion x level, and each dead-leaves scene x distortion at one
    level (see ``_plan``). Pool: the same with the pool distortions, recorded with its content_id so pool
    images of a split's test content can be left out. The seed drives the scenes and the noise.

    The contents are made in parallel on ``workers`` processes (None: every usable core, one per ten
    contents at most; 1: in this process); the output is the same for any number.
    """
    out_dir = Path(out_dir)
    distortions = tuple(distortions)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"demo seed must be a non-negative integer, got {seed!r}")
    _check_counts(n_references, n_scenes, n_levels, pool_levels, image_size, distortions)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"demo workers must be a positive integer or None (every core), got {workers!r}")
    _prepare_folder(out_dir)
    references = REFERENCES[:n_references]
    scenes = tuple(scene_name(i) for i in range(n_scenes))
    contents = [(name, None) for name in references] + [(name, index) for index, name in enumerate(scenes)]
    job = _Job(out_dir, seed, n_levels, pool_levels, image_size, distortions)
    results = _make_contents(job, contents, _n_workers(workers, len(contents)), progress)
    scored = [row for rows, _ in results for row in rows]
    pooled = [row for _, rows in results for row in rows]
    written = {f"{REFS_DIR}/{name}.png" for name, _ in contents} | {row[0] for row in scored + pooled}
    _remove_stale(out_dir, written)
    _write_csv(out_dir / SCORES_FILE, ["image", "mos", "ref", "distortion", "level"], scored)
    _write_csv(out_dir / POOL_FILE, ["image", "content_id"], pooled)
    mos = [float(row[1]) for row in scored]
    summary = DemoSummary(out_dir=out_dir, seed=seed, references=references, scenes=scenes,
                          distortions=distortions, n_levels=n_levels, n_images=len(scored), n_pool=len(pooled),
                          mos_min=min(mos), mos_max=max(mos))
    (out_dir / README_FILE).write_text(_readme(summary, image_size, pool_levels), encoding="utf-8")
    return summary


def _readme(summary: DemoSummary, image_size: int, pool_levels: int) -> str:
    def table(items: Sequence[Distortion], n: int) -> str:
        return "\n".join(f"| {d.name} | {d.unit} | {', '.join(f'{s:.3g}' for s in d.strengths(n))} |"
                         for d in items)

    sources = (f"{len(summary.references)} images that ship inside installed wheels "
               f"({', '.join(summary.references) or 'none'}) and {len(summary.scenes)} procedural dead-leaves scenes")
    return f"""# QFM demo dataset (synthetic)

This dataset is **synthetic**: its scores are computed, not collected from people. It was made by
`qfm demo-data` (`qfm.data.demo.make_demo`) with seed {summary.seed}, from {sources}.
grace_hopper is matplotlib's sample photograph, china and flower are scikit-learn's
(`sklearn.datasets.load_sample_image`), the other packaged images are scikit-image's (each `skimage.data`
function's docstring gives its source, and its licence where known).

## How it is made
1. Each packaged image is centre-cropped to a square and resized (Lanczos) to {image_size}x{image_size} RGB
   (smaller ones are upscaled); grayscale photographs are copied into three channels.
   Each scene (`scene_NNN`) is drawn by `qfm.data.dead_leaves` from the seed: opaque discs and
   rectangles with power-law radii, its own palette and surface texture, anti-aliased. Dead leaves is
   the texture chart of camera image-quality testing (ISO 19567-2): it has the scale invariance and
   edges of photographs, and every seed is a new content. The undistorted contents are in `{REFS_DIR}/`.
2. Each packaged image is distorted at all {summary.n_levels} levels (1 = mildest) of each type below; each
   scene once per type, at level (scene number + type number) mod {summary.n_levels} + 1, so the levels are
   balanced over the scenes. JPEG images are decoded and saved losslessly, so they keep their JPEG
   artefacts. All images are PNG, in `{IMAGES_DIR}/`.

| distortion | strength | levels |
| --- | --- | --- |
{table([DISTORTIONS[d] for d in summary.distortions], summary.n_levels)}

3. Score: {SCORE_DESCRIPTION}.
   It simulates a subjective study: each type's strengths run from just visible to severe, so the
   level sets most of the opinion, and SSIM (Wang et al., Gaussian window, sigma 1.5, on luma in
   [0, 1], against the reference) adds how visible the distortion is on this content (blur hardly
   shows on a smooth photograph). SSIM alone is not used: it varies with content in ways the
   distorted image does not show, so no model could learn it from the image alone. The scale is
   {MOS_MIN:g}-{MOS_MAX:g}, higher is better; this run's scores span {summary.mos_min:.1f}-{summary.mos_max:.1f}.
4. `{SCORES_FILE}`: image, mos, ref, distortion, level ({summary.n_images} rows). `ref` is the content id:
   splits keep every content in one part.

## Unlabelled pool
`{POOL_FILE}` lists {summary.n_pool} images in `{POOL_DIR}/` with their `content_id` and no score, for
pseudo-labelling (DLE). They carry other distortions at {pool_levels} levels (a scene: each once, as above):

| distortion | strength | levels |
| --- | --- | --- |
{table(list(POOL_DISTORTIONS.values()), pool_levels) if pool_levels else ''}

Pool images share content with the scored images: leave out those whose content_id is in a split's test
part.

## Use
`qfm ingest --format demo --root <this folder> --out <manifest folder>`
"""
