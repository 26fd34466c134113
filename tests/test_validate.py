"""The validate step: a clean manifest passes; each kind of damage fails exactly its own expectation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qfm.data.manifest import Manifest, RawDataset, ScoreScale, build_manifest, read_manifest, write_manifest
from qfm.data.splits import SplitProtocol
from qfm.data.validate import REPORT_HTML, REPORT_JSON, raise_if_failed, validate_manifest
from qfm.errors import DataError

N_REFS, N_LEVELS, N_SPLITS = 6, 2, 3
MIN_SIDE = 32  # the tests' images are 64x48; the minimum is lowered to keep them small


def make_manifest(root: Path, sizes: dict[str, tuple[int, int]] | None = None) -> Manifest:
    """A small synthetic dataset (N_REFS references x N_LEVELS levels, PNG and JPEG) on disk, ingested."""
    rng = np.random.default_rng(0)
    (root / "Images").mkdir(parents=True)
    rows = []
    for r in range(N_REFS):
        for level in range(N_LEVELS):
            name = f"r{r}_l{level}.{'jpg' if level % 2 else 'png'}"
            size = (sizes or {}).get(name, (64, 48))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "Images" / name)
            rows.append({"image_id": name, "path": f"Images/{name}", "mos_raw": 1.0 + 8.0 * rng.random(),
                         "content_id": f"ref{r}", "distortion_type": "noise", "distortion_level": float(level),
                         "source": f"scores.csv line {len(rows) + 2}"})
    raw = RawDataset(dataset="tiny", root=root, scale=ScoreScale(1.0, 9.0), table=pd.DataFrame(rows),
                     synthetic=True)
    return build_manifest(raw, SplitProtocol(n_splits=N_SPLITS), progress=False)


def validate(manifest: Manifest, **kw):
    return validate_manifest(manifest, min_width=kw.pop("min_width", MIN_SIDE),
                             min_height=kw.pop("min_height", MIN_SIDE), progress=False, **kw)


def failed_names(result) -> list[str]:
    return [o.name for o in result.failed]


def only_failure(result, name: str) -> str:
    """Assert that exactly the named expectation failed and return its sentence."""
    assert not result.success
    assert failed_names(result) == [name]
    return result.failed[0].message


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Manifest:
    return make_manifest(tmp_path_factory.mktemp("clean"))


@pytest.fixture
def broken(clean) -> Manifest:
    """A private copy of the clean manifest to damage (the image files are shared and must stay intact)."""
    return Manifest(frame=clean.frame.copy(), root=clean.root, meta=copy.deepcopy(clean.meta))


def test_clean_manifest_passes_and_report_lists_every_expectation(clean, tmp_path):
    # Through Parquet and back, as `qfm validate DIR` will read it.
    write_manifest(clean, tmp_path / "manifest")
    manifest = read_manifest(tmp_path / "manifest")
    result = validate(manifest, report_dir=tmp_path / "report")
    assert result.success, result.summary()
    assert manifest.frame["mos_std"].isna().all()  # a nullable column left empty is fine

    splits = [f"split_{i}" for i in range(N_SPLITS)]
    required = ["image_id", "path", "mos", "mos_raw", "mos_std", "content_id", "distortion_type",
                "distortion_level", "dataset", *splits]
    not_null = [c for c in required if c not in {"mos_std", "distortion_type", "distortion_level"}]
    expected = (["row_count"] + [f"column_exists:{c}" for c in required] + [f"not_null:{c}" for c in not_null]
                + ["type:mos", "type:mos_raw", "unique:image_id", "range:mos", "range:mos_raw"]
                + [f"split_{kind}:{c}" for c in splits for kind in ("values", "disjoint")]
                + ["files_decode", "min_width", "min_height"])
    report = json.loads((tmp_path / "report" / REPORT_JSON).read_text())
    assert [e["name"] for e in report["expectations"]] == expected
    assert all(e["success"] is True and e["evaluated"] for e in report["expectations"])
    assert report["success"] is True and report["failures"] == []
    assert report["counts"] == {"expectations": len(expected), "evaluated": len(expected),
                                "passed": len(expected), "failed": 0, "not_evaluated": 0}
    by_name = {e["name"]: e for e in report["expectations"]}
    assert by_name["row_count"]["observed_value"] == N_REFS * N_LEVELS
    assert by_name["range:mos_raw"]["kwargs"] == {"column": "mos_raw", "min_value": 1.0, "max_value": 9.0}
    assert by_name["files_decode"]["element_count"] == N_REFS * N_LEVELS
    assert by_name["files_decode"]["unexpected_count"] == 0
    page = (tmp_path / "report" / REPORT_HTML).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<tr class=\"pass\">") == len(expected)
    raise_if_failed(result)  # nothing to raise


def test_deleted_image_fails_the_file_check(tmp_path):
    manifest = make_manifest(tmp_path / "data")
    (tmp_path / "data" / "Images" / "r2_l0.png").unlink()
    message = only_failure(validate(manifest), "files_decode")
    assert message.startswith("image file missing or undecodable: Images/r2_l0.png (file does not exist)")
    assert "(1 of 12 rows)" in message


def test_truncated_jpeg_fails_the_file_check(tmp_path):
    manifest = make_manifest(tmp_path / "data")
    jpeg = tmp_path / "data" / "Images" / "r4_l1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    message = only_failure(validate(manifest), "files_decode")
    assert "Images/r4_l1.jpg (cannot decode" in message


def test_too_small_image_fails_width_or_height(tmp_path):
    manifest = make_manifest(tmp_path / "data", sizes={"r1_l0.png": (20, 40)})
    assert only_failure(validate(manifest), "min_width") == (
        f"image narrower than {MIN_SIDE} px: Images/r1_l0.png (width 20) (1 of 12 rows)")
    assert only_failure(validate(manifest, min_width=16, min_height=45), "min_height") == (
        "image lower than 45 px: Images/r1_l0.png (height 40) (1 of 12 rows)")
    message = only_failure(validate(manifest, min_width=16, min_height=50), "min_height")
    assert message.startswith("image lower than 50 px: Images/r0_l0.png (height 48), ")
    assert message.endswith(" … and 7 more (12 of 12 rows)")  # five examples are named


def test_duplicate_image_id(broken):
    broken.frame.loc[5, "image_id"] = broken.frame.loc[2, "image_id"]
    message = only_failure(validate(broken), "unique:image_id")
    assert message == ("column 'image_id' has duplicated values: r1_l0.png (Images/r1_l0.png), "
                       "r1_l0.png (Images/r2_l1.jpg) (2 of 12 rows)")


def test_mos_outside_unit_range(broken):
    broken.frame.loc[3, "mos"] = 1.25
    message = only_failure(validate(broken), "range:mos")
    assert message == "column 'mos' has values outside [0, 1]: r1_l1.jpg (mos=1.25) (1 of 12 rows)"


def test_mos_raw_outside_declared_scale(broken):
    broken.frame.loc[7, "mos_raw"] = 9.5
    message = only_failure(validate(broken), "range:mos_raw")
    assert message == ("column 'mos_raw' has values outside the declared scale [1, 9]: r3_l1.jpg (mos_raw=9.5) "
                       "(1 of 12 rows)")


def test_text_scores_fail_the_type_check_and_the_range_check_says_why_it_could_not_run(broken):
    broken.frame["mos"] = broken.frame["mos"].astype(str)
    result = validate(broken)
    assert failed_names(result) == ["type:mos", "range:mos"]
    assert result.failed[0].message == "column 'mos' is not a float64 column (observed str)"
    assert result.failed[1].message.startswith("column 'mos' has values outside [0, 1]: the check could not run (")


def test_null_in_a_required_column(broken):
    broken.frame.loc[4, "content_id"] = pd.NA
    broken.frame.loc[6, "mos_std"] = np.nan  # nullable: no failure
    message = only_failure(validate(broken), "not_null:content_id")
    assert message == "column 'content_id' has empty values: r2_l0.png (1 of 12 rows)"


def test_content_in_train_and_test_of_one_split(broken):
    frame = broken.frame
    rows = frame.index[frame["content_id"] == "ref0"]
    frame.loc[rows[0], "split_1"], frame.loc[rows[1], "split_1"] = "train", "test"
    result = validate(broken)
    message = only_failure(result, "split_disjoint:split_1")
    assert message == ("split 'split_1' puts the same content_id in more than one part: "
                       "r0_l0.png (content_id 'ref0' in test+train), r0_l1.jpg (content_id 'ref0' in test+train) "
                       "(2 of 12 rows)")
    examples = result.failed[0].examples
    assert {e["image_id"] for e in examples} == {"r0_l0.png", "r0_l1.jpg"}


def test_unknown_split_value(broken):
    broken.frame.loc[0, "split_2"] = "tran"
    message = only_failure(validate(broken), "split_values:split_2")
    assert message == "column 'split_2' has values other than train/val/test: r0_l0.png ('tran') (1 of 12 rows)"


@pytest.mark.parametrize("column", ["mos_raw", "split_2"])
def test_missing_required_column(broken, column):
    broken.frame = broken.frame.drop(columns=[column])
    result = validate(broken)
    assert only_failure(result, f"column_exists:{column}") == (
        f"required column '{column}' is missing from the manifest")
    not_run = [o.name for o in result.outcomes if not o.evaluated]
    assert not_run == ({"mos_raw": ["not_null:mos_raw", "type:mos_raw", "range:mos_raw"],
                        "split_2": ["not_null:split_2", "split_values:split_2", "split_disjoint:split_2"]}[column])
    assert result.counts["not_evaluated"] == len(not_run)


def test_failures_raise_a_data_error_and_reach_the_report(broken, tmp_path):
    broken.frame.loc[0, "mos"] = -0.5
    broken.frame.loc[1, "image_id"] = "r0_l0.png"
    result = validate(broken, report_dir=tmp_path)
    assert failed_names(result) == ["unique:image_id", "range:mos"]
    with pytest.raises(DataError) as err:
        raise_if_failed(result, tmp_path)
    text = str(err.value)
    assert "FAILED" in text and "2 failed" in text
    assert "column 'mos' has values outside [0, 1]: r0_l0.png (mos=-0.5)" in text
    assert str(tmp_path / REPORT_HTML) in text
    report = json.loads((tmp_path / REPORT_JSON).read_text())
    assert report["success"] is False and len(report["failures"]) == 2
    entry = next(e for e in report["expectations"] if e["name"] == "range:mos")
    assert entry["unexpected_count"] == 1
    assert entry["examples"] == [{"mos": -0.5, "image_id": "r0_l0.png", "path": "Images/r0_l0.png",
                                  "content_id": "ref0"}]
    assert (tmp_path / REPORT_HTML).read_text().count('<tr class="fail">') == 2


def test_manifest_without_scale_is_a_data_error(broken):
    del broken.meta["scale"]
    with pytest.raises(DataError, match="records no score scale"):
        validate(broken)
