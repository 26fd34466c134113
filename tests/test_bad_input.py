"""Every kind of bad input, through the csv adapter and build_manifest: a clear error naming the file or row,
and for row-level problems the opt-in skip path (skip_invalid) that lists what it left out and why."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_adapter_csv import write_dataset

from qfm.data.adapters import read_dataset
from qfm.data.manifest import build_manifest
from qfm.data.splits import SplitProtocol
from qfm.errors import ConfigError, DataError

PROTOCOL = SplitProtocol(n_splits=2)
GOOD = [f"img{i}.jpg,{1 + 0.5 * i}" for i in range(6)]  # scores.csv lines 2..7
BAD_LINE = 4  # the row of img2.jpg


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    """Keep the JPEG headers, replace the compressed image data with random bytes."""
    data = bytearray(path.read_bytes())
    start = data.find(b"\xff\xda") + 20  # just past the start-of-scan header
    data[start:-2] = np.random.default_rng(0).integers(0, 256, len(data) - start - 2, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _text(path: Path) -> None:
    path.write_text("image,mos\nthis is a text file renamed to .jpg\n")


# name: (how to break img2.jpg or its row, the reason the error gives)
ROW_PROBLEMS = {
    "missing_image": (lambda root: (root / "img2.jpg").unlink(), "file does not exist"),
    "truncated_jpeg": (lambda root: _truncate(root / "img2.jpg"), r"cannot decode \(.*[Tt]runcated"),
    "corrupt_jpeg": (lambda root: _garble(root / "img2.jpg"), "cannot decode"),
    "non_image_file": (lambda root: _text(root / "img2.jpg"), "not an image file"),
    "empty_score": ("img2.jpg,", "score is empty or not a number"),
    "nan_score": ("img2.jpg,NaN", "score is empty or not a number"),
    "score_out_of_range": ("img2.jpg,7.5", r"score 7.5 is outside the declared range \[1.0, 5.0\]"),
}


def make(root: Path, problem: str) -> Path:
    lines = list(GOOD)
    breaker = ROW_PROBLEMS[problem][0]
    if isinstance(breaker, str):
        lines[BAD_LINE - 2] = breaker
    write_dataset(root, lines)
    if not isinstance(breaker, str):
        breaker(root)
    return root


def ingest(root: Path, skip_invalid: bool = False, **options):
    raw = read_dataset("csv", root, **({"score_min": 1, "score_max": 5} | options))
    return build_manifest(raw, PROTOCOL, skip_invalid=skip_invalid, progress=False)


@pytest.mark.parametrize("problem", list(ROW_PROBLEMS))
def test_bad_row_stops_ingestion_naming_file_line_and_reason(tmp_path, problem):
    root = make(tmp_path, problem)
    with pytest.raises(DataError, match=rf"scores.csv line {BAD_LINE}: img2.jpg: {ROW_PROBLEMS[problem][1]}") as info:
        ingest(root)
    assert "--skip-invalid" in str(info.value)


@pytest.mark.parametrize("problem", list(ROW_PROBLEMS))
def test_bad_row_is_left_out_and_listed_when_skipping_is_asked_for(tmp_path, problem):
    manifest = ingest(make(tmp_path, problem), skip_invalid=True)
    assert manifest.frame["image_id"].tolist() == ["img0.jpg", "img1.jpg", "img3.jpg", "img4.jpg", "img5.jpg"]
    assert manifest.meta["n_skipped"] == 1 and manifest.meta["n_listed"] == 6
    (skipped,) = manifest.meta["skipped"]
    assert {k: skipped[k] for k in ("image_id", "path", "source")} == {
        "image_id": "img2.jpg", "path": "img2.jpg", "source": f"scores.csv line {BAD_LINE}"}
    assert re.search(ROW_PROBLEMS[problem][1], skipped["reason"])
    assert manifest.frame.set_index("image_id").loc["img5.jpg", "mos"] == pytest.approx(0.625)  # 3.5 of [1, 5]


def test_duplicate_image_names_name_both_lines(tmp_path):
    lines = list(GOOD)
    lines[BAD_LINE - 2] = "img1.jpg,4.0"  # img1.jpg on lines 3 and 4
    write_dataset(tmp_path, lines)
    with pytest.raises(DataError, match="2 duplicate image names") as info:
        ingest(tmp_path)
    for line in (3, 4):
        assert f"scores.csv line {line}: img1.jpg: duplicate image name" in str(info.value)


def test_duplicate_image_names_are_both_left_out_when_skipping(tmp_path):
    lines = list(GOOD)
    lines[BAD_LINE - 2] = "img1.jpg,4.0"
    write_dataset(tmp_path, lines)
    manifest = ingest(tmp_path, skip_invalid=True)
    assert manifest.frame["image_id"].tolist() == ["img0.jpg", "img3.jpg", "img4.jpg", "img5.jpg"]
    assert manifest.meta["n_skipped"] == 2
    assert [s["source"] for s in manifest.meta["skipped"]] == ["scores.csv line 3", "scores.csv line 4"]
    assert all("duplicate" in s["reason"] for s in manifest.meta["skipped"])


def test_missing_score_file_names_it_and_the_option(tmp_path):
    write_dataset(tmp_path, GOOD)
    (tmp_path / "scores.csv").rename(tmp_path / "mos.csv")
    with pytest.raises(DataError, match=r"score file .*scores.csv is missing; .* option scores_file="):
        ingest(tmp_path)
    assert len(ingest(tmp_path, scores_file="mos.csv").frame) == 6


def test_wrong_columns_name_the_file_the_option_and_the_columns_found(tmp_path):
    write_dataset(tmp_path, GOOD, header="filename,score")
    with pytest.raises(DataError, match=r"scores.csv: no column 'image' \(option image_column\), no column 'mos' "
                                        r"\(option score_column\); the header has columns \['filename', 'score'\]"):
        ingest(tmp_path)
    assert len(ingest(tmp_path, image_column="filename", score_column="score").frame) == 6


def test_unknown_format_suggests_the_close_match(tmp_path):
    write_dataset(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"unknown dataset format 'cvs'\. Did you mean 'csv'"):
        read_dataset("cvs", tmp_path, score_min=1, score_max=5)


def test_header_only_file_is_an_empty_dataset(tmp_path):
    write_dataset(tmp_path, [])
    with pytest.raises(DataError, match=r"scores.csv: has a header but no rows"):
        ingest(tmp_path)


def test_empty_file_needs_a_header(tmp_path):
    (tmp_path / "scores.csv").write_text("")
    with pytest.raises(DataError, match=r"scores.csv: the file is empty"):
        ingest(tmp_path)


def test_every_row_bad_is_an_error_even_when_skipping(tmp_path):
    write_dataset(tmp_path, [f"img{i}.jpg,9" for i in range(3)], n_images=3)
    with pytest.raises(DataError, match="every one of its 3 rows was invalid"):
        ingest(tmp_path, skip_invalid=True)
