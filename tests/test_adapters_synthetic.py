"""The synthetic-dataset adapters (KADID-10k, TID2013, CSIQ, LIVE release 2) on tiny copies of each layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.io
from fixtures_synthetic import cell_array, live_arrays, make_csiq, make_kadid, make_live, make_tid2013

from qfm.data.adapters import ADAPTERS, read_dataset
from qfm.data.manifest import build_manifest
from qfm.data.splits import check_disjoint
from qfm.errors import ConfigError, DataError


def build(raw):
    return build_manifest(raw, progress=False)


def assert_content_disjoint(manifest) -> None:
    assert manifest.split_columns
    for column in manifest.split_columns:
        assert check_disjoint(manifest.frame, column) == []
        assert set(manifest.frame[column]) == {"train", "val", "test"}


def test_all_synthetic_formats_are_registered():
    for name in ("kadid10k", "tid2013", "csiq", "live"):
        assert name in ADAPTERS and ADAPTERS[name].synthetic


# --- KADID-10k -------------------------------------------------------------------------------------

def test_kadid_rows_scores_and_content(tmp_path):
    written = make_kadid(tmp_path)
    raw = read_dataset("kadid10k", tmp_path)
    assert raw.scale.lo == 1.0 and raw.scale.hi == 5.0 and raw.scale.higher_is_better
    m = build(raw)
    frame = m.frame.set_index("image_id")
    assert len(frame) == len(written) == 20
    first = frame.loc["I01_01_01.png"]
    assert first["mos_raw"] == 4.57 and first["mos"] == pytest.approx((4.57 - 1) / 4)
    assert first["mos_std"] == 0.496  # column var is the standard deviation
    assert first["path"] == "images/I01_01_01.png" and first["content_id"] == "I01.png"
    assert first["distortion_type"] == "gaussian blur" and first["distortion_level"] == 1
    assert frame.loc["I03_10_03.png", "distortion_type"] == "jpeg"
    assert frame.loc["I03_10_03.png", "distortion_level"] == 3
    assert (np.diff(m.frame.sort_values("mos_raw")["mos"]) >= 0).all()  # higher dmos = higher mos
    assert m.frame.groupby("content_id").size().to_dict() == {f"I0{r}.png": 4 for r in range(1, 6)}
    assert raw.table.loc[0, "source"] == "dmos.csv line 2"
    assert_content_disjoint(m)


def test_kadid_missing_score_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"dmos\.csv"):
        read_dataset("kadid10k", tmp_path)


def test_kadid_wrong_columns_name_the_file_and_what_was_found(tmp_path):
    (tmp_path / "dmos.csv").write_text("image,score\nI01_01_01.png,4.5\n")
    with pytest.raises(DataError, match=r"dmos\.csv.*dist_img.*found \['image', 'score'\]"):
        read_dataset("kadid10k", tmp_path)


def test_kadid_unexpected_name_and_bad_var_name_the_line(tmp_path):
    (tmp_path / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4,0.5\nfoo.png,I01.png,3,1\n")
    with pytest.raises(DataError, match=r"dmos\.csv line 3.*'foo\.png'"):
        read_dataset("kadid10k", tmp_path)
    (tmp_path / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4,high\n")
    with pytest.raises(DataError, match=r"dmos\.csv line 2, var.*'high'"):
        read_dataset("kadid10k", tmp_path)
    (tmp_path / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nI01_26_01.png,I01.png,4,0.5\n")
    with pytest.raises(DataError, match=r"line 2.*distortion code 26"):
        read_dataset("kadid10k", tmp_path)


def test_kadid_missing_image_is_reported_with_its_row(tmp_path):
    make_kadid(tmp_path)
    (tmp_path / "images" / "I02_10_03.png").unlink()
    with pytest.raises(DataError, match=r"dmos\.csv line \d+: images/I02_10_03\.png: file does not exist"):
        build(read_dataset("kadid10k", tmp_path))


# --- TID2013 ---------------------------------------------------------------------------------------

def test_tid2013_rows_scores_case_variants_and_content(tmp_path):
    written = make_tid2013(tmp_path)
    raw = read_dataset("tid2013", tmp_path)
    assert (raw.scale.lo, raw.scale.hi, raw.scale.higher_is_better) == (0.0, 9.0, True)
    m = build(raw)  # decodes every image: the case variants were all found
    frame = m.frame.set_index("image_id")
    assert len(frame) == len(written) == 20
    first = frame.loc["i01_01_1.bmp"]
    assert first["path"] == "distorted_images/I01_01_1.bmp"  # spelled as on disk
    assert first["mos_raw"] == 5.51429 and first["mos"] == pytest.approx(5.51429 / 9)
    assert first["mos_std"] == 0.13013
    assert first["content_id"] == "I01" and first["distortion_type"] == "additive gaussian noise"
    assert frame.loc["i01_11_1.bmp", "path"] == "distorted_images/I01_11_1.BMP"
    assert frame.loc["i25_11_2.bmp", "distortion_type"] == "jpeg2000 compression"
    assert frame.loc["i25_11_2.bmp", "distortion_level"] == 2
    assert sorted(m.frame["content_id"].unique()) == ["I01", "I02", "I03", "I04", "I25"]
    assert raw.table.loc[3, "source"] == "mos_with_names.txt line 4"
    assert_content_disjoint(m)


def test_tid2013_without_std_file_says_so(tmp_path):
    make_tid2013(tmp_path, with_std=False)
    raw = read_dataset("tid2013", tmp_path)
    assert raw.table["mos_std"].isna().all() and "absent" in raw.notes["mos_std"]


def test_tid2013_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"mos_with_names\.txt"):
        read_dataset("tid2013", tmp_path)
    make_tid2013(tmp_path)
    (tmp_path / "mos_std.txt").write_text("0.1\n0.2\n")
    with pytest.raises(DataError, match=r"mos_std\.txt has 2 values but mos_with_names\.txt has 20"):
        read_dataset("tid2013", tmp_path)
    (tmp_path / "mos_std.txt").unlink()
    (tmp_path / "mos_with_names.txt").write_text("5.1 i01_01_1.bmp\n4.2\n")
    with pytest.raises(DataError, match=r"mos_with_names\.txt line 2: expected 'MOS name'"):
        read_dataset("tid2013", tmp_path)
    (tmp_path / "mos_with_names.txt").write_text("5.1 img01.bmp\n")
    with pytest.raises(DataError, match=r"line 1: image name 'img01\.bmp'"):
        read_dataset("tid2013", tmp_path)


def test_tid2013_score_out_of_range_names_the_line(tmp_path):
    (tmp_path / "mos_with_names.txt").write_text("5.1 i01_01_1.bmp\n9.5 i02_01_1.bmp\n")
    with pytest.raises(DataError, match=r"mos_with_names\.txt line 2.*9\.5 is outside the declared range \[0\.0, 9\.0\]"):
        build_manifest(read_dataset("tid2013", tmp_path), check_images=False, progress=False)


# --- CSIQ ------------------------------------------------------------------------------------------

def test_csiq_rows_scores_and_content(tmp_path):
    written = make_csiq(tmp_path)
    raw = read_dataset("csiq", tmp_path)
    assert (raw.scale.lo, raw.scale.hi, raw.scale.higher_is_better) == (0.0, 1.0, False)
    m = build(raw)  # unrated files on disk are simply not listed
    frame = m.frame.set_index("image_id")
    assert len(frame) == len(written) == 30
    for w in written:
        row = frame.loc[w["image_id"]]
        assert row["path"] == w["path"] and row["content_id"] == f"{w['image']}.png"
        assert row["mos_raw"] == w["dmos"] and row["mos"] == pytest.approx(1 - w["dmos"])
        assert row["distortion_type"] == w["dst_type"] and row["distortion_level"] == w["level"]
        assert row["mos_std"] == 0.05
    assert frame.loc["1600.AWGN.1.png", "path"] == "dst_imgs/awgn/1600.AWGN.1.png"
    assert frame.loc["boston.jpeg2000.2.png", "distortion_type"] == "jpeg 2000"
    assert m.frame.groupby("content_id").size().nunique() == 1 and m.frame["content_id"].nunique() == 5
    assert raw.table.loc[0, "source"] == "csiq.DMOS.xlsx sheet all_by_image row 5"
    assert_content_disjoint(m)


def test_csiq_finds_case_variant_folders(tmp_path):
    make_csiq(tmp_path)
    (tmp_path / "dst_imgs" / "awgn").rename(tmp_path / "dst_imgs" / "AWGN")
    m = build(read_dataset("csiq", tmp_path))
    assert m.frame.set_index("image_id").loc["1600.AWGN.2.png", "path"] == "dst_imgs/AWGN/1600.AWGN.2.png"


def test_csiq_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"csiq\.DMOS\.xlsx"):
        read_dataset("csiq", tmp_path)
    make_csiq(tmp_path, header=["image", "dst_idx", "dst_type", "dst_lev", "std", "dmos"])
    with pytest.raises(DataError, match=r"csiq\.DMOS\.xlsx: missing column\(s\) \['dmos_std'\]; found .*'std'"):
        read_dataset("csiq", tmp_path)
    make_csiq(tmp_path, sheet="Sheet1")
    with pytest.raises(DataError, match=r"no sheet 'all_by_image'.*\['Sheet1', 'all_by_distortion'\]"):
        read_dataset("csiq", tmp_path)


def test_csiq_unknown_type_names_the_row(tmp_path):
    make_csiq(tmp_path, types=("noise", "pink noise"))
    with pytest.raises(DataError, match=r"sheet all_by_image row 7: .*dst_type='pink noise'"):
        read_dataset("csiq", tmp_path)


def test_csiq_not_a_workbook(tmp_path):
    (tmp_path / "csiq.DMOS.xlsx").write_text("image,dmos\n")
    with pytest.raises(DataError, match=r"csiq\.DMOS\.xlsx: not a readable \.xlsx workbook"):
        read_dataset("csiq", tmp_path)


# --- LIVE release 2 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("databaserelease2")
    return root, make_live(root)


def test_live_rows_order_scores_and_content(live):
    root, arrays = live
    raw = read_dataset("live", root)
    assert (raw.scale.lo, raw.scale.hi, raw.scale.higher_is_better) == (0.0, 100.0, False)
    m = build(raw)
    kept = arrays["orgs"] == 0
    assert len(m.frame) == kept.sum() == 982 - 197
    frame = m.frame.set_index("image_id")
    # entry 228 (index 227) is jpeg/img1.bmp, entry 461 (index 460) is wn/img1.bmp: the published order
    for index, name in [(1, "jp2k/img2.bmp"), (227 + 1, "jpeg/img2.bmp"), (460 + 3, "wn/img4.bmp"),
                        (981, "fastfading/img174.bmp")]:
        row = frame.loc[name]
        assert row["mos_raw"] == arrays["dmos"][index]
        assert row["mos"] == pytest.approx(1 - arrays["dmos"][index] / 100)
        assert row["content_id"] == arrays["refs"][index] and row["path"] == name
        assert row["distortion_type"] == name.split("/")[0] and np.isnan(row["distortion_level"])
    assert "jp2k/img1.bmp" not in frame.index  # orgs == 1: a reference image, left out
    assert m.frame["mos_std"].isna().all()
    assert raw.notes["left_out"].startswith("197 entries")
    assert raw.table.set_index("image_id").loc["jpeg/img2.bmp", "source"] == "dmos.mat[228]"
    assert_content_disjoint(m)


def test_live_realigned_option(live):
    root, arrays = live
    raw = read_dataset("live", root, realigned="true")
    assert raw.scale.higher_is_better is False and raw.scale.lo <= -2.5 and raw.scale.hi >= 111.0
    frame = build_manifest(raw, check_images=False, progress=False).frame.set_index("image_id")
    assert frame.loc["jp2k/img2.bmp", "mos_raw"] == -2.5
    assert frame.loc["jp2k/img2.bmp", "mos"] == pytest.approx(1 - (-2.5 - raw.scale.lo) / (raw.scale.hi - raw.scale.lo))
    assert frame.loc["jp2k/img3.bmp", "mos_raw"] == 111.0 and frame.loc["jp2k/img3.bmp", "mos"] > 0
    assert frame.loc["wn/img4.bmp", "mos_std"] == arrays["dmos_std"][463]
    assert raw.notes["scores"] == "dmos_realigned.mat"
    with pytest.raises(ConfigError, match="realigned"):
        read_dataset("live", root, realigned="maybe")


def test_live_errors_name_the_files(tmp_path):
    with pytest.raises(DataError, match=r"refnames_all\.mat"):
        read_dataset("live", tmp_path)
    arrays = live_arrays()
    make_live(tmp_path, arrays, images=False)
    (tmp_path / "dmos.mat").unlink()
    with pytest.raises(DataError, match=r"dmos\.mat"):
        read_dataset("live", tmp_path)
    scipy.io.savemat(tmp_path / "dmos.mat", {"scores": np.zeros((1, 982)), "orgs": np.zeros((1, 982))})
    with pytest.raises(DataError, match=r"dmos\.mat: no variable 'dmos'; it holds \['orgs', 'scores'\]"):
        read_dataset("live", tmp_path)
    scipy.io.savemat(tmp_path / "dmos.mat", {"dmos": np.zeros((1, 980)), "orgs": np.zeros((1, 980))})
    with pytest.raises(DataError, match=r"must each hold 982 entries.*'dmos': 980"):
        read_dataset("live", tmp_path)
    scipy.io.savemat(tmp_path / "refnames_all.mat", {"refnames_all": cell_array(["bikes.bmp"] * 982)})
    scipy.io.savemat(tmp_path / "dmos.mat", {"dmos": np.zeros((1, 982)), "orgs": np.full((1, 982), 2.0)})
    with pytest.raises(DataError, match=r"orgs must be 0 .* or 1"):
        read_dataset("live", tmp_path)


def test_live_refnames_are_cell_strings(live):
    root, arrays = live
    refs = scipy.io.loadmat(root / "refnames_all.mat")["refnames_all"]
    assert refs.dtype == object and refs.shape == (1, 982)
    table = read_dataset("live", root).table
    assert isinstance(table, pd.DataFrame) and set(table["content_id"]) <= set(arrays["refs"])
