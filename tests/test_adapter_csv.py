"""The generic CSV adapter (format `csv`): options, score mapping, line-numbered sources, layout errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from qfm.data.adapters import ADAPTERS, read_dataset
from qfm.data.manifest import build_manifest
from qfm.data.splits import SplitProtocol, check_disjoint
from qfm.errors import ConfigError, DataError

PROTOCOL = SplitProtocol(n_splits=3)


def write_photo(path: Path, index: int, size: int = 48) -> Path:
    """A real photograph (a crop of scikit-image's astronaut), saved in the format of the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    top, left = 40 + 37 * index % 400, 60 + 53 * index % 400
    Image.fromarray(data.astronaut()[top:top + size, left:left + size]).save(path)
    return path


def write_dataset(root: Path, lines: list[str], header: str = "image,mos", scores_file: str = "scores.csv",
                  folder: str = "", n_images: int = 6) -> Path:
    """img0.jpg … img{n-1}.jpg under root/folder and a score file with the given header and rows."""
    for i in range(n_images):
        write_photo(root / folder / f"img{i}.jpg", i)
    (root / scores_file).parent.mkdir(parents=True, exist_ok=True)
    (root / scores_file).write_text("\n".join([header, *lines]) + "\n")
    return root


def good_lines(n: int = 6) -> list[str]:
    return [f"img{i}.jpg,{1 + 0.5 * i}" for i in range(n)]


def test_csv_and_demo_formats_are_registered():
    assert not ADAPTERS["csv"].synthetic
    assert ADAPTERS["demo"].synthetic


def test_default_options_read_image_and_mos_with_line_sources(tmp_path):
    root = write_dataset(tmp_path, good_lines())
    raw = read_dataset("csv", root, score_min=1, score_max=5)
    assert list(raw.table["image_id"]) == [f"img{i}.jpg" for i in range(6)]
    assert list(raw.table["path"]) == [f"img{i}.jpg" for i in range(6)]
    assert list(raw.table["source"]) == [f"scores.csv line {n}" for n in range(2, 8)]
    manifest = build_manifest(raw, PROTOCOL, progress=False)
    assert manifest.frame["mos"].tolist() == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.625])
    assert manifest.frame["content_id"].tolist() == manifest.frame["image_id"].tolist()
    assert manifest.meta["scale"] == {"lo": 1.0, "hi": 5.0, "higher_is_better": True, "kind": "MOS"}
    assert manifest.meta["image_size"]["min_width"] == 48


def test_lower_is_better_maps_exact_values(tmp_path):
    lines = ["img0.jpg,0", "img1.jpg,25", "img2.jpg,50", "img3.jpg,80", "img4.jpg,100"]
    root = write_dataset(tmp_path, lines, header="image,dmos", n_images=5)
    raw = read_dataset("csv", root, score_column="dmos", score_min=0, score_max=100, higher_is_better=False)
    manifest = build_manifest(raw, PROTOCOL, progress=False)
    assert manifest.frame["mos"].tolist() == pytest.approx([1.0, 0.75, 0.5, 0.2, 0.0])
    assert manifest.frame["mos_raw"].tolist() == [0.0, 25.0, 50.0, 80.0, 100.0]
    assert manifest.meta["scale"]["higher_is_better"] is False


def test_all_options_columns_folder_and_separator(tmp_path):
    header = "file;MOS;SD;reference;type;strength;note"
    lines = ["img0.jpg;4.5;0.5;refA;blur;1;x", "img1.jpg;3.5;0.25;refA;blur;2;",
             "img2.jpg;2.0;;refB;noise;1;y", "img3.jpg;1.5;1.0;refB;noise;2;",
             "img4.jpg;3.0;0.75;refC;;;", "img5.jpg;5.0;0.5;refC;jpeg;3;z"]
    root = write_dataset(tmp_path, lines, header=header, scores_file="labels/labels.csv", folder="photos/all")
    raw = read_dataset("csv", root, scores_file="labels/labels.csv", image_column="file", score_column="MOS",
                       score_min="1", score_max="5", std_column="SD", content_column="reference",
                       distortion_type_column="type", distortion_level_column="strength",
                       image_folder="photos/all", separator=";")
    assert raw.table["path"].iloc[0] == "photos/all/img0.jpg"
    assert raw.table["source"].iloc[2] == "labels/labels.csv line 4"
    manifest = build_manifest(raw, PROTOCOL, progress=False)
    frame = manifest.frame
    assert frame["mos"].tolist() == pytest.approx([0.875, 0.625, 0.25, 0.125, 0.5, 1.0])
    assert frame["mos_std"].iloc[:2].tolist() == [0.5, 0.25] and np.isnan(frame["mos_std"].iloc[2])
    assert frame["content_id"].tolist() == ["refA", "refA", "refB", "refB", "refC", "refC"]
    assert frame["distortion_type"].iloc[0] == "blur" and frame["distortion_type"].isna().iloc[4]
    assert frame["distortion_level"].iloc[5] == 3.0 and np.isnan(frame["distortion_level"].iloc[4])
    for column in manifest.split_columns:
        assert check_disjoint(frame, column) == []
        assert frame.groupby("content_id")[column].nunique().max() == 1


def test_string_options_from_the_command_line_are_understood(tmp_path):
    root = write_dataset(tmp_path, ["img0.jpg,10", "img1.jpg,90"], n_images=2)
    raw = read_dataset("csv", root, score_min="0", score_max="100", higher_is_better="false")
    assert raw.scale.higher_is_better is False and (raw.scale.lo, raw.scale.hi) == (0.0, 100.0)


def test_blank_lines_keep_true_line_numbers(tmp_path):
    root = write_dataset(tmp_path, ["img0.jpg,1", "", "img1.jpg,2", "img2.jpg,3"], n_images=3)
    raw = read_dataset("csv", root, score_min=1, score_max=5)
    assert list(raw.table["source"]) == ["scores.csv line 2", "scores.csv line 4", "scores.csv line 5"]


@pytest.mark.parametrize(("options", "missing"), [
    ({}, "score_min and score_max"),
    ({"score_min": 1}, "score_max"),
    ({"score_max": 5}, "score_min"),
])
def test_undeclared_score_range_names_the_option_and_how_to_pass_it(tmp_path, options, missing):
    root = write_dataset(tmp_path, good_lines())
    with pytest.raises(ConfigError, match=f"missing option {missing}") as info:
        read_dataset("csv", root, **options)
    assert "--option score_min=1 --option score_max=5" in str(info.value)


@pytest.mark.parametrize(("options", "message"), [
    ({"score_min": 5, "score_max": 1}, "score_max .* must be greater than score_min"),
    ({"score_min": "low", "score_max": 5}, "score_min must be a number"),
    ({"score_min": 1, "score_max": 5, "higher_is_better": "maybe"}, "higher_is_better must be true or false"),
    ({"score_min": 1, "score_max": 5, "separator": ";;"}, "separator must be one character"),
])
def test_bad_option_values(tmp_path, options, message):
    root = write_dataset(tmp_path, good_lines())
    with pytest.raises(ConfigError, match=message):
        read_dataset("csv", root, **options)


def test_row_with_wrong_field_count_names_its_line(tmp_path):
    root = write_dataset(tmp_path, ["img0.jpg,1", "img1.jpg,2,extra", "img2.jpg,3"])
    with pytest.raises(DataError, match=r"scores.csv line 3: 3 fields, but the header \(line 1\) has 2"):
        read_dataset("csv", root, score_min=1, score_max=5)


def test_other_separator_is_suggested(tmp_path):
    root = write_dataset(tmp_path, ["img0.jpg;1", "img1.jpg;2"], header="image;mos")
    with pytest.raises(DataError, match="pass separator=';'"):
        read_dataset("csv", root, score_min=1, score_max=5)


def test_close_column_name_is_suggested(tmp_path):
    root = write_dataset(tmp_path, ["img0.jpg,1", "img1.jpg,2"], header="image,MOS")
    with pytest.raises(DataError, match=r"column 'mos' \(option score_column\) \(did you mean 'MOS'\?\)"):
        read_dataset("csv", root, score_min=1, score_max=5)


def test_absolute_image_path_is_refused_with_its_line(tmp_path):
    root = write_dataset(tmp_path, ["img0.jpg,1", f"{tmp_path / 'img1.jpg'},2"])
    with pytest.raises(DataError, match="scores.csv line 3: image path .* is absolute"):
        read_dataset("csv", root, score_min=1, score_max=5)


@pytest.mark.parametrize(("line", "options", "message"), [
    (",3,a", {}, "scores.csv line 3: the image column 'image' is empty"),
    ("img1.jpg,3,", {"content_column": "ref"}, "scores.csv line 3: the content column 'ref' is empty"),
    ("img1.jpg,3,big", {"std_column": "ref"}, "scores.csv line 3: std \\('ref'\\) 'big' is not a number"),
    ("img1.jpg,3,x", {"distortion_level_column": "ref"}, "scores.csv line 3: distortion level"),
])
def test_bad_cells_name_their_line(tmp_path, line, options, message):
    root = write_dataset(tmp_path, ["img0.jpg,1,7", line, "img2.jpg,2,8"], header="image,mos,ref")
    with pytest.raises(DataError, match=message):
        read_dataset("csv", root, score_min=1, score_max=5, **options)
