"""The authentic-dataset adapters (LIVEC, KonIQ-10k, SPAQ, FLIVE) on tiny copies of each release layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from fixtures_authentic import make_flive, make_koniq, make_livec, make_spaq, write_image, write_xlsx

from qfm.data.adapters import ADAPTERS, read_dataset
from qfm.data.manifest import build_manifest
from qfm.errors import ConfigError, DataError

CLIVE_DEV = Path(__file__).resolve().parents[2] / "shared/datasets/clive-dev/ChallengeDB_release"


def build(raw):
    return build_manifest(raw, progress=False)


def test_all_authentic_formats_are_registered():
    for name in ("livec", "koniq10k", "spaq", "flive"):
        assert name in ADAPTERS and not ADAPTERS[name].synthetic


# --- LIVEC -----------------------------------------------------------------------------------------

LIVEC_ENTRIES = [("10.bmp", 63.5, 18.25), ("1000.JPG", 20.0, 15.0), ("101.bmp", 87.25, 12.5),
                 ("1004.JPG", 45.0, 20.5), ("106.bmp", 0.0, 9.0)]


def test_livec_leaves_out_the_seven_rater_training_entries(tmp_path):
    root = make_livec(tmp_path, LIVEC_ENTRIES)
    manifest = build(read_dataset("livec", root))
    frame = manifest.frame
    assert frame["image_id"].tolist() == [e[0] for e in LIVEC_ENTRIES]
    assert not frame["path"].str.contains("trainingImages").any()
    assert frame["path"].tolist() == [f"Images/{e[0]}" for e in LIVEC_ENTRIES]
    assert frame["mos"].tolist() == pytest.approx([0.635, 0.2, 0.8725, 0.45, 0.0])
    assert frame["mos_std"].tolist() == pytest.approx([18.25, 15.0, 12.5, 20.5, 9.0])
    assert (frame["content_id"] == frame["image_id"]).all()
    assert all((root / p).is_file() for p in frame["path"])
    assert manifest.meta["scale"] == {"lo": 0.0, "hi": 100.0, "higher_is_better": True, "kind": "MOS"}
    assert manifest.meta["n_listed"] == 5


def test_livec_missing_score_file_is_named(tmp_path):
    root = make_livec(tmp_path, LIVEC_ENTRIES)
    (root / "Data/AllMOS_release.mat").unlink()
    with pytest.raises(DataError, match="AllMOS_release.mat"):
        read_dataset("livec", root)


def test_livec_wrong_variable_names_the_file_and_its_keys(tmp_path):
    root = make_livec(tmp_path, LIVEC_ENTRIES)
    scipy.io.savemat(root / "Data/AllMOS_release.mat", {"MOS": np.zeros((1, 12))})
    with pytest.raises(DataError, match=r"AllMOS_release.mat: no variable 'AllMOS_release'; it holds \['MOS'\]"):
        read_dataset("livec", root)


def test_livec_files_of_different_lengths_fail(tmp_path):
    root = make_livec(tmp_path, LIVEC_ENTRIES)
    scipy.io.savemat(root / "Data/AllStdDev_release.mat", {"AllStdDev_release": np.ones((1, 11))})
    with pytest.raises(DataError, match="lists 12 images .* AllStdDev_release.mat 11"):
        read_dataset("livec", root)


def test_livec_real_clive_dev_release():
    if not CLIVE_DEV.is_dir():
        pytest.skip(f"shared dataset clive-dev is not present at {CLIVE_DEV}")
    manifest = build(read_dataset("livec", CLIVE_DEV))
    frame = manifest.frame
    assert len(frame) == 600
    assert frame["mos"].between(0.0, 1.0).all()
    assert frame["mos_std"].notna().all()
    assert manifest.split_columns == [f"split_{i}" for i in range(10)]
    assert not frame["path"].str.contains("trainingImages").any()
    assert all((CLIVE_DEV / p).is_file() for p in frame["path"])


# --- KonIQ-10k -------------------------------------------------------------------------------------

KONIQ_ROWS = [("10004473376.jpg", 3.83, 0.527, 77.38), ("10007357496.jpg", 3.5, 0.58, 68.73),
              ("100117038.jpg", 1.0, 0.4, 1.0), ("10319713194.jpg", 5.0, 0.44, 100.0),
              ("826373.jpg", 3.0, 0.6, 50.5)]
KONIQ_NAMES = [r[0] for r in KONIQ_ROWS]


def test_koniq_default_is_the_zscore_mos_on_1_to_100(tmp_path):
    root = make_koniq(tmp_path / "koniq10k", KONIQ_ROWS)
    raw = read_dataset("koniq10k", root)
    manifest = build(raw)
    frame = manifest.frame
    assert frame["image_id"].tolist() == KONIQ_NAMES
    assert frame["path"].tolist() == [f"1024x768/{n}" for n in KONIQ_NAMES]
    assert frame["mos_raw"].tolist() == pytest.approx([77.38, 68.73, 1.0, 100.0, 50.5])
    assert frame["mos"].tolist() == pytest.approx([76.38 / 99, 67.73 / 99, 0.0, 1.0, 0.5])
    assert frame["mos_std"].isna().all()
    assert (frame["content_id"] == frame["image_id"]).all()
    assert raw.table["source"].tolist()[:2] == ["koniq10k_scores_and_distributions.csv line 2",
                                                "koniq10k_scores_and_distributions.csv line 3"]
    assert manifest.meta["scale"]["lo"] == 1.0 and manifest.meta["scale"]["hi"] == 100.0
    assert manifest.meta["notes"]["score_column"] == "MOS_zscore"


def test_koniq_plain_mos_on_1_to_5_keeps_sd(tmp_path):
    root = make_koniq(tmp_path, KONIQ_ROWS)
    frame = build(read_dataset("koniq10k", root, score="MOS")).frame
    assert frame["mos"].tolist() == pytest.approx([0.7075, 0.625, 0.0, 1.0, 0.5])
    assert frame["mos_std"].tolist() == pytest.approx([0.527, 0.58, 0.4, 0.44, 0.6])


def test_koniq_half_size_image_folder(tmp_path):
    root = make_koniq(tmp_path, KONIQ_ROWS, folders=("512x384",))
    frame = build(read_dataset("koniq10k", root, image_folder="512x384")).frame
    assert frame["path"].tolist() == [f"512x384/{n}" for n in KONIQ_NAMES]
    with pytest.raises(DataError, match=r"1024x768 does not exist.*\['512x384'\]"):
        read_dataset("koniq10k", root)


def test_koniq_unknown_score_option(tmp_path):
    root = make_koniq(tmp_path, KONIQ_ROWS)
    with pytest.raises(ConfigError, match="score 'mos' is unknown.*MOS_zscore"):
        read_dataset("koniq10k", root, score="mos")


def test_koniq_official_split_is_kept_as_a_raw_column(tmp_path):
    sets = ["training", "test", "training", "validation", "test"]
    root = make_koniq(tmp_path, KONIQ_ROWS, sets=sets)
    raw = read_dataset("koniq10k", root)
    assert raw.table["official_split"].tolist() == ["train", "test", "train", "val", "test"]
    assert "koniq10k_distributions_sets.csv" in raw.notes["official_split"]
    pd.DataFrame({"image_name": KONIQ_NAMES, "set": ["training"] * 4 + ["holdout"]}).to_csv(
        root / "koniq10k_distributions_sets.csv", index=False)
    with pytest.raises(DataError, match=r"koniq10k_distributions_sets.csv: column 'set' has unknown .*holdout"):
        read_dataset("koniq10k", root)


def test_koniq_missing_score_file_is_named(tmp_path):
    root = make_koniq(tmp_path, KONIQ_ROWS)
    (root / "koniq10k_scores_and_distributions.csv").unlink()
    with pytest.raises(DataError, match="koniq10k_scores_and_distributions.csv is missing"):
        read_dataset("koniq10k", root)


def test_koniq_wrong_columns_name_the_file_and_the_columns_found(tmp_path):
    root = make_koniq(tmp_path, KONIQ_ROWS)
    pd.DataFrame({"img": KONIQ_NAMES, "score": [3.0] * 5}).to_csv(
        root / "koniq10k_scores_and_distributions.csv", index=False)
    with pytest.raises(DataError) as err:
        read_dataset("koniq10k", root)
    message = str(err.value)
    assert "koniq10k_scores_and_distributions.csv" in message
    assert "['image_name', 'MOS_zscore']" in message and "found ['img', 'score']" in message


def test_koniq_blank_name_and_out_of_range_score_name_their_lines(tmp_path):
    root = make_koniq(tmp_path, KONIQ_ROWS)
    scores = root / "koniq10k_scores_and_distributions.csv"
    frame = pd.read_csv(scores)
    frame.loc[3, "MOS_zscore"] = 0.5
    frame.to_csv(scores, index=False)
    with pytest.raises(DataError, match=r"line 5: 1024x768/10319713194.jpg: score 0.5 is outside .*\[1.0, 100.0\]"):
        build(read_dataset("koniq10k", root))
    frame.loc[1, "image_name"] = None
    frame.to_csv(scores, index=False)
    with pytest.raises(DataError, match=r"1 row\(s\) have no image name \(line 3\)"):
        read_dataset("koniq10k", root)


# --- SPAQ ------------------------------------------------------------------------------------------

SPAQ_ROWS = [("00001.jpg", 48.86), ("00002.jpg", 62.5), ("00003.jpg", 77.25), ("00004.jpg", 0.0),
             ("00005.jpg", 100.0)]


def test_spaq_reads_the_annotation_workbook(tmp_path):
    root = make_spaq(tmp_path / "SPAQ", SPAQ_ROWS)
    raw = read_dataset("spaq", root)
    frame = build(raw).frame
    assert frame["image_id"].tolist() == [r[0] for r in SPAQ_ROWS]
    assert frame["path"].tolist() == [f"TestImage/{r[0]}" for r in SPAQ_ROWS]
    assert frame["mos"].tolist() == pytest.approx([0.4886, 0.625, 0.7725, 0.0, 1.0])
    assert frame["mos_std"].isna().all()
    assert (frame["content_id"] == frame["image_id"]).all()
    assert raw.table["source"].iloc[0] == "MOS and Image attribute scores.xlsx row 2"


def test_spaq_missing_workbook_is_named(tmp_path):
    root = make_spaq(tmp_path, SPAQ_ROWS)
    (root / "Annotations/MOS and Image attribute scores.xlsx").unlink()
    with pytest.raises(DataError, match="MOS and Image attribute scores.xlsx is missing"):
        read_dataset("spaq", root)


def test_spaq_wrong_columns_name_the_file_and_the_columns_found(tmp_path):
    root = make_spaq(tmp_path, SPAQ_ROWS)
    write_xlsx(root / "Annotations/MOS and Image attribute scores.xlsx", ["Image", "Score"],
               [[n, m] for n, m in SPAQ_ROWS])
    with pytest.raises(DataError, match=r"scores.xlsx: missing column\(s\) \['Image name', 'MOS'\]; "
                                        r"found \['Image', 'Score'\]"):
        read_dataset("spaq", root)


def test_spaq_workbook_that_is_not_xlsx(tmp_path):
    root = make_spaq(tmp_path, SPAQ_ROWS)
    (root / "Annotations/MOS and Image attribute scores.xlsx").write_text("Image name,MOS\n00001.jpg,50\n")
    with pytest.raises(DataError, match="scores.xlsx is not a readable .xlsx workbook"):
        read_dataset("spaq", root)


# --- FLIVE -----------------------------------------------------------------------------------------

FLIVE_ROWS = [("voc_emotic_ava/AVA__129332.jpg", 58.65), ("voc_emotic_ava/EMOTIC__2ccz61xjvddut42ywu.jpg", 74.0),
              ("voc_emotic_ava/JPEGImages__2007_001630.jpg", 69.5), ("voc_emotic_ava/VOC2012__2008_000497.jpg", 77.5),
              ("blur_dataset/motion0091.jpg", 0.0), ("blur_dataset/out_of_focus0059.jpg", 72.75),
              ("EE371R/rq73.jpg", 75.0)]
FLIVE_NAMES = [r[0] for r in FLIVE_ROWS]
FLIVE_MOS = [0.5865, 0.74, 0.695, 0.775, 0.0, 0.7275, 0.75]


def test_flive_from_the_repository_folder(tmp_path):
    root = make_flive(tmp_path / "FLIVE_Database", FLIVE_ROWS)
    raw = read_dataset("flive", root)
    frame = build(raw).frame
    assert frame["image_id"].tolist() == FLIVE_NAMES
    assert frame["path"].tolist() == [f"database/{n}" for n in FLIVE_NAMES]
    assert frame["mos"].tolist() == pytest.approx(FLIVE_MOS)
    assert frame["mos_std"].isna().all()
    assert (frame["content_id"] == frame["image_id"]).all()
    assert raw.table["source"].iloc[-1] == "labels_image.csv line 8"


def test_flive_from_the_database_folder(tmp_path):
    root = make_flive(tmp_path, FLIVE_ROWS) / "database"
    frame = build(read_dataset("flive", root)).frame
    assert frame["path"].tolist() == FLIVE_NAMES
    assert frame["mos"].tolist() == pytest.approx(FLIVE_MOS)


def test_flive_labels_at_top_with_images_under_database(tmp_path):
    root = make_flive(tmp_path, FLIVE_ROWS)
    (root / "database/labels_image.csv").rename(root / "labels_image.csv")
    frame = build(read_dataset("flive", root, image_folder="database")).frame
    assert frame["path"].tolist() == [f"database/{n}" for n in FLIVE_NAMES]
    with pytest.raises(DataError, match=r"(?s)7 image files that are missing.*labels_image.csv line 2: voc_emotic_ava/AVA__129332.jpg"):
        build(read_dataset("flive", root))


def test_flive_missing_labels_file_is_named(tmp_path):
    root = make_flive(tmp_path, FLIVE_ROWS)
    (root / "database/labels_image.csv").unlink()
    with pytest.raises(DataError, match="labels_image.csv is missing"):
        read_dataset("flive", root)


def test_flive_wrong_columns_name_the_file_and_the_columns_found(tmp_path):
    root = make_flive(tmp_path, FLIVE_ROWS)
    pd.DataFrame({"name_image": FLIVE_NAMES, "mos_image": [50.0] * 7}).to_csv(
        root / "database/labels_image.csv", index=False)
    with pytest.raises(DataError, match=r"labels_image.csv: missing column\(s\) \['name', 'mos'\]; "
                                        r"found \['name_image', 'mos_image'\]"):
        read_dataset("flive", root)


def test_flive_unlisted_images_are_ignored_and_listed_missing_images_fail(tmp_path):
    root = make_flive(tmp_path, FLIVE_ROWS)
    write_image(root / "database/voc_emotic_ava/AVA__999.jpg", seed=99)  # on disk, not in the labels
    assert len(build(read_dataset("flive", root)).frame) == 7
    (root / "database/EE371R/rq73.jpg").unlink()
    with pytest.raises(DataError, match=r"labels_image.csv line 8: database/EE371R/rq73.jpg: file does not exist"):
        build(read_dataset("flive", root))
