"""The demo dataset: layout, learnable scores (spread, monotone in level), determinism, ingestion, splits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qfm.data.adapters import read_dataset
from qfm.data.demo import PHOTOGRAPHS, load_reference, make_demo, scene_name
from qfm.data.distortions import DISTORTIONS, POOL_DISTORTIONS
from qfm.data.manifest import build_manifest
from qfm.data.splits import SplitProtocol, check_disjoint
from qfm.errors import ConfigError

TINY = {"n_references": 3, "n_scenes": 2, "n_levels": 2, "pool_levels": 1, "image_size": 64, "progress": False}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo at its default sizes, made once for this module."""
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo(out, seed=0, progress=False)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CONTENTS = tuple(scene_name(i) for i in range(80))


@pytest.fixture(scope="module")
def photographs(tmp_path_factory):
    """Four packaged photographs at every level of every distortion (the optional part of the demo)."""
    out = tmp_path_factory.mktemp("photographs")
    return out, make_demo(out, seed=0, n_references=4, n_scenes=0, pool_levels=0, image_size=128, progress=False)


def test_default_layout_and_counts(demo):
    out, summary = demo
    assert summary.references == () and summary.scenes == CONTENTS
    assert summary.n_images == 80 * len(DISTORTIONS) == 320
    assert summary.n_pool == 80 * len(POOL_DISTORTIONS) == 320
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == ["image", "mos", "ref", "distortion", "level"] and len(scores) == 320
    assert set(scores["ref"]) == set(CONTENTS) and set(scores["level"]) == {1, 2, 3, 4}
    pool = pd.read_csv(out / "pool.csv")
    assert list(pool.columns) == ["image", "content_id"] and len(pool) == 320
    assert set(pool["content_id"]) == set(CONTENTS)
    assert set(pool["image"]).isdisjoint(scores["image"])
    for relative in [*scores["image"], *pool["image"]]:
        with Image.open(out / relative) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (384, 384))
    assert sorted(p.stem for p in (out / "refs").glob("*.png")) == sorted(CONTENTS)
    readme = (out / "DEMO.md").read_text()
    assert "synthetic" in readme and "SSIM" in readme and "pool.csv" in readme and "dead-leaves" in readme


def test_each_scene_has_each_distortion_once_with_the_levels_balanced(demo):
    scores = pd.read_csv(demo[0] / "scores.csv")
    assert all(sorted(group) == sorted(DISTORTIONS) for _, group in scores.groupby("ref")["distortion"])
    assert scores.groupby(["distortion", "level"]).size().tolist() == [20] * 16  # 80 scenes, 4 levels
    pool = pd.read_csv(demo[0] / "pool.csv")
    for ref, group in pool.groupby("content_id")["image"]:
        expected = [f"pool/{ref}_{d}_{(int(ref[-3:]) + i) % 3 + 1}.png" for i, d in enumerate(POOL_DISTORTIONS)]
        assert sorted(group) == sorted(expected), ref


def test_packaged_photographs_get_every_level_of_every_distortion(photographs):
    out, summary = photographs
    assert summary.references == PHOTOGRAPHS[:4] and summary.scenes == () and summary.n_pool == 0
    scores = pd.read_csv(out / "scores.csv")
    assert scores.groupby("ref").size().to_dict() == {name: 16 for name in PHOTOGRAPHS[:4]}
    for name in ("grace_hopper", "china", "flower"):  # matplotlib's and scikit-learn's photographs
        assert load_reference(name, 64).std() > 20


def test_scores_spread_across_the_range(demo):
    mos = pd.read_csv(demo[0] / "scores.csv")["mos"]
    assert mos.min() < 20 and mos.max() > 90 and mos.std() > 15
    counts, _ = np.histogram(mos, bins=5, range=(0, 100))
    assert counts[0] > 0 and (counts[1:] >= 0.1 * len(mos)).all(), counts


def test_score_is_half_level_half_ssim(demo):
    """Each score is 100 * (0.5 * (1 - impairment(level)) + 0.5 * SSIM): recomputed here from the images."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    out = demo[0]
    scores = pd.read_csv(out / "scores.csv").sample(8, random_state=0)
    for row in scores.itertuples():
        with Image.open(out / "refs" / f"{row.ref}.png") as ref, Image.open(out / row.image) as img:
            ssim = structural_similarity(rgb2gray(np.asarray(ref)), rgb2gray(np.asarray(img)), data_range=1.0,
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        level_part = 1 - (0.1 + 0.7 * (row.level - 1) / 3)
        assert row.mos == pytest.approx(100 * (0.5 * level_part + 0.5 * max(ssim, 0.0)), abs=2e-3), row


def test_scores_fall_strictly_with_level_within_each_photograph_and_type(photographs):
    scores = pd.read_csv(photographs[0] / "scores.csv").sort_values("level")
    for (ref, distortion), group in scores.groupby(["ref", "distortion"]):
        assert len(group) == 4 and (np.diff(group["mos"].to_numpy()) < 0).all(), (ref, distortion)


def test_scene_scores_fall_with_level(demo):
    scores = pd.read_csv(demo[0] / "scores.csv")
    medians = scores.groupby("level")["mos"].median().to_numpy()
    assert (np.diff(medians) < -5).all(), medians
    for distortion, group in scores.groupby("distortion"):  # 20 scenes per level and type: little overlap
        by_level = group.groupby("level")["mos"]
        assert (by_level.max().to_numpy()[1:] < by_level.min().to_numpy()[:-1] + 5).all(), distortion


def test_jpeg_images_keep_their_artefacts(demo):
    out = demo[0]
    with Image.open(out / "refs/scene_001.png") as ref, Image.open(out / "images/scene_001_jpeg_4.png") as img:
        diff = np.abs(np.asarray(ref, dtype=int) - np.asarray(img, dtype=int))
    assert diff.mean() > 3  # quality 5 JPEG: far from the reference, yet stored losslessly as PNG


def test_demo_ingests_with_content_disjoint_splits(demo):
    out, summary = demo
    raw = read_dataset("demo", out)
    assert raw.synthetic and raw.dataset == "demo"
    manifest = build_manifest(raw, SplitProtocol(), progress=False)
    frame = manifest.frame
    assert len(frame) == summary.n_images and manifest.meta["n_skipped"] == 0
    assert frame["mos"].to_numpy() == pytest.approx(frame["mos_raw"].to_numpy() / 100)
    assert set(frame["content_id"]) == set(CONTENTS)
    assert set(frame["distortion_type"]) == set(DISTORTIONS)
    assert len(manifest.split_columns) == 10
    for column in manifest.split_columns:
        assert check_disjoint(frame, column) == []
        parts = frame.groupby(column)["content_id"].nunique()
        assert parts["test"] >= 2 and parts["val"] >= 1, parts
    assert len({tuple(frame[c]) for c in manifest.split_columns}) == 10  # ten different splits


def test_same_seed_gives_identical_bytes_and_another_seed_other_noise(tmp_path):
    """The same bytes for a seed whether the contents are made on worker processes or in this one."""
    first, again, other = (make_demo(tmp_path / name, seed=seed, workers=workers, **TINY)
                           for name, seed, workers in (("a", 1, 2), ("b", 1, 1), ("c", 2, None)))
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and dataclasses.replace(first, out_dir=again.out_dir) == again
    assert len(a) == 3 * 4 * 2 + 2 * 4 + 3 * 4 * 1 + 2 * 4 + 3 + 2 + 3  # scored, pool, contents, CSVs, DEMO.md
    changed = {name for name in a if a[name] != c[name]}
    scenes = {n for n in a if "scene_" in n}
    noisy = {n for n in a if "_noise_" in n or "_saltpepper_" in n}
    assert scenes <= changed and noisy <= changed and "scores.csv" in changed and "DEMO.md" in changed
    assert not {n for n in changed - noisy - scenes if n.endswith(".png")}, "the seed draws scenes and noise"
    assert other.seed == 2


def test_rerun_into_the_same_folder_is_idempotent_and_removes_stale_images(tmp_path):
    out = tmp_path / "demo"
    make_demo(out, seed=0, **TINY)
    before = files(out)
    make_demo(out, seed=0, **TINY)
    assert files(out) == before
    make_demo(out, seed=0, **(TINY | {"n_references": 2}))
    make_demo(tmp_path / "fresh", seed=0, **(TINY | {"n_references": 2}))
    assert files(out) == files(tmp_path / "fresh")


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no DEMO.md"):
        make_demo(tmp_path, **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("option", "value"), [
    ("n_references", -1), ("n_references", 20), ("n_scenes", -1), ("n_scenes", 1000), ("n_levels", 1), ("n_levels", 9), ("pool_levels", -1),
    ("image_size", 16), ("distortions", ("blur", "fog")), ("distortions", ("blur", "blur")), ("seed", -1),
    ("workers", 0),
])
def test_bad_counts_name_the_parameter(tmp_path, option, value):
    with pytest.raises(ConfigError, match=f"demo {option}"):
        make_demo(tmp_path / "x", **(TINY | {option: value}))


def test_needs_two_contents_and_can_be_scenes_only(tmp_path):
    with pytest.raises(ConfigError, match="at least 2 contents"):
        make_demo(tmp_path / "x", **(TINY | {"n_references": 1, "n_scenes": 0}))
    summary = make_demo(tmp_path / "scenes", **(TINY | {"n_references": 0, "n_scenes": 2}))
    assert summary.references == () and summary.n_images == 2 * len(DISTORTIONS)


def test_bad_options_write_nothing_and_a_half_written_folder_can_be_rerun(tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(ConfigError):
        make_demo(out, **(TINY | {"distortions": ("blur", "fog")}))  # fails before writing anything
    assert not out.exists()
    make_demo(out, **(TINY | {"n_references": 2}))
    (out / "scores.csv").unlink()  # as if stopped half-way: images there, tables not yet
    make_demo(out, **TINY)
    assert (out / "scores.csv").is_file() and "being written" not in (out / "DEMO.md").read_text()
