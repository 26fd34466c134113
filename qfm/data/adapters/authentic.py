"""Adapters for authentically distorted datasets: LIVEC, KonIQ-10k, SPAQ, LIVE-FB (FLIVE / PaQ-2-PiQ).

Each reads the release folder exactly as published. Authentic images have no reference image, so each
image is its own content_id (the manifest builder fills it in).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd

from qfm.data.adapters import register, require_columns, require_file
from qfm.data.adapters.matfiles import load_mat_variable, mat_numbers, mat_strings
from qfm.data.manifest import RawDataset, ScoreScale
from qfm.errors import ConfigError, DataError

LIVEC_RATER_TRAINING_ENTRIES = 7

KONIQ_SCORES_FILE = "koniq10k_scores_and_distributions.csv"
KONIQ_SETS_FILE = "koniq10k_distributions_sets.csv"
KONIQ_IMAGE_FOLDERS = ("1024x768", "512x384")
KONIQ_SCALES = {"MOS_zscore": ScoreScale(1.0, 100.0, True, "MOS"), "MOS": ScoreScale(1.0, 5.0, True, "MOS")}
KONIQ_SETS = {"training": "train", "validation": "val", "test": "test"}

SPAQ_SCORES_FILE = "Annotations/MOS and Image attribute scores.xlsx"
SPAQ_IMAGE_FOLDER = "TestImage"

FLIVE_LABELS_FILE = "labels_image.csv"


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    """A CSV score file as a table, or a DataError naming the file."""
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{what}: {path} is not a readable CSV file ({exc})") from exc


def _names(values: pd.Series, file: Path, row_label: str, first_row: int) -> list[str]:
    """Image names as stripped strings; blank or missing names fail, naming their rows in the file."""
    names = values.astype("string").str.strip()
    blank = (names.isna() | (names == "")).fillna(True).to_numpy(dtype=bool)
    if blank.any():
        rows = [f"{row_label} {first_row + i}" for i in blank.nonzero()[0][:10]]
        raise DataError(f"{file}: {int(blank.sum())} row(s) have no image name ({', '.join(rows)}); "
                        "fix or delete those rows")
    return names.tolist()


def _image_folder(root: Path, folder: str, what: str, hint: str) -> None:
    """Fail early, naming the folder, when the image folder the layout needs is absent."""
    if not (root / folder).is_dir():
        raise DataError(f"{what}: image folder {root / folder} does not exist. {hint}")


@register("livec", "LIVE In the Wild Image Quality Challenge (CLIVE), ChallengeDB_release layout")
def read_livec(root: Path) -> RawDataset:
    """ChallengeDB_release: Data/AllImages_release.mat, AllMOS_release.mat, AllStdDev_release.mat; Images/.

    Entries 0-6 are the rater-training images (Images/trainingImages/t1..t7.bmp) and are left out, as
    every standard loader does (HyperIQA's LIVEChallengeFolder: ``AllImages_release[7:1169]``). MOS is 0-100,
    higher = better; AllStdDev_release gives mos_std.
    """
    names_file = require_file(root, "Data/AllImages_release.mat", "LIVEC")
    mos_file = require_file(root, "Data/AllMOS_release.mat", "LIVEC")
    std_file = require_file(root, "Data/AllStdDev_release.mat", "LIVEC")
    names = mat_strings(load_mat_variable(names_file, "AllImages_release"))
    mos = mat_numbers(load_mat_variable(mos_file, "AllMOS_release"))
    std = mat_numbers(load_mat_variable(std_file, "AllStdDev_release"))
    if not len(names) == len(mos) == len(std):
        raise DataError(f"LIVEC: {names_file.name} lists {len(names)} images but {mos_file.name} has {len(mos)} "
                        f"scores and {std_file.name} {len(std)}; the three files must have the same length")
    first = LIVEC_RATER_TRAINING_ENTRIES
    table = pd.DataFrame({
        "image_id": names[first:],
        "path": [f"Images/{n}" for n in names[first:]],
        "mos_raw": mos[first:],
        "mos_std": std[first:],
        "source": [f"{mos_file.name}[{i}]" for i in range(first, len(names))],
    })
    return RawDataset(dataset="livec", root=root, scale=ScoreScale(0.0, 100.0, True, "MOS"), table=table,
                      notes={"left_out": f"entries 0-{first - 1} (rater-training images)"})


@register("koniq10k", "KonIQ-10k: koniq10k_scores_and_distributions.csv with images in 1024x768/ (or 512x384/)")
def read_koniq10k(root: Path, image_folder: str = "1024x768", score: str = "MOS_zscore") -> RawDataset:
    """KonIQ-10k as downloaded from the KonIQ database site.

    Layout: ``koniq10k_scores_and_distributions.csv`` (columns image_name, c1..c5, c_total, MOS, SD,
    MOS_zscore; one row per image, 10,073 rows) and the images in ``1024x768/`` or ``512x384/``
    (``image_folder``). ``score`` picks the label: ``MOS_zscore`` (default; the z-scored MOS rescaled to
    1-100, which the KonIQ authors' own koniq10k_distributions_sets.csv calls "MOS" and which HyperIQA's and
    DEIQT's Koniq_10kFolder and pyiqa's KonIQ10k meta-info train on, so our numbers compare with theirs;
    mos_std is then NaN as no SD is published on that scale) or ``MOS`` (the plain mean of the 1-5 ACR
    ratings, with SD as mos_std). Higher = better for both.

    If ``koniq10k_distributions_sets.csv`` (from github.com/subpic/koniq, columns image_name, c1..c5,
    c_total, MOS, SD, set) sits beside the scores file, its official split ('training'/'validation'/'test')
    is kept as the extra raw column ``official_split`` (train/val/test); our own splits are made later.
    """
    if score not in KONIQ_SCALES:
        raise ConfigError(f"KonIQ-10k: score '{score}' is unknown; use one of {list(KONIQ_SCALES)}")
    scores_file = require_file(root, KONIQ_SCORES_FILE, "KonIQ-10k")
    present = [f for f in KONIQ_IMAGE_FOLDERS if (root / f).is_dir()]
    _image_folder(root, image_folder, "KonIQ-10k",
                  f"Image folders present: {present or 'none'}; choose one with image_folder=...")
    frame = _read_csv(scores_file, "KonIQ-10k")
    needed = ["image_name", score] + (["SD"] if score == "MOS" else [])
    require_columns(frame.columns, needed, scores_file)
    names = _names(frame["image_name"], scores_file, "line", 2)
    table = pd.DataFrame({
        "image_id": names,
        "path": [f"{image_folder}/{n}" for n in names],
        "mos_raw": frame[score].to_numpy(),
        "mos_std": frame["SD"].to_numpy() if score == "MOS" else float("nan"),
        "source": [f"{scores_file.name} line {i + 2}" for i in range(len(frame))],
    })
    notes = {"score_column": score, "image_folder": image_folder}
    sets_file = root / KONIQ_SETS_FILE
    if sets_file.is_file():
        table["official_split"] = _koniq_official_split(sets_file, names)
        notes["official_split"] = f"column official_split from {KONIQ_SETS_FILE} ('set': training/validation/test)"
    return RawDataset(dataset="koniq10k", root=root, scale=KONIQ_SCALES[score], table=table, notes=notes)


def _koniq_official_split(sets_file: Path, names: list[str]) -> list[str]:
    """The published train/val/test assignment for each image, from koniq10k_distributions_sets.csv."""
    sets = _read_csv(sets_file, "KonIQ-10k")
    require_columns(sets.columns, ["image_name", "set"], sets_file)
    lookup = dict(zip(_names(sets["image_name"], sets_file, "line", 2), sets["set"].astype(str).str.strip()))
    unknown = sorted(set(lookup.values()) - set(KONIQ_SETS))
    if unknown:
        raise DataError(f"{sets_file}: column 'set' has unknown value(s) {unknown}; expected {list(KONIQ_SETS)}")
    missing = [n for n in names if n not in lookup]
    if missing:
        raise DataError(f"{sets_file}: {len(missing)} image(s) of {KONIQ_SCORES_FILE} are not listed, e.g. "
                        f"{missing[:5]}; use the release's own file or remove it")
    return [KONIQ_SETS[lookup[n]] for n in names]


@register("spaq", "SPAQ: Annotations/MOS and Image attribute scores.xlsx with images in TestImage/")
def read_spaq(root: Path, image_folder: str = SPAQ_IMAGE_FOLDER) -> RawDataset:
    """SPAQ (Smartphone Photography Attribute and Quality) as released by its authors.

    Layout: ``Annotations/MOS and Image attribute scores.xlsx`` (first sheet, header row; columns
    'Image name', 'MOS', 'Brightness', 'Colorfulness', 'Contrast', 'Noisiness', 'Sharpness'; 11,125 rows)
    and the full-size images ``TestImage/00001.jpg`` … ``11125.jpg``. MOS is 0-100, higher = better; no
    per-image standard deviation is published (mos_std is NaN). Matches pyiqa's scripts/process_spaq.py
    (pd.read_excel of the same file) and the SPAQ repo's loaders (h4nwei/SPAQ: 'TestImage', row_values[0]).
    """
    scores_file = require_file(root, SPAQ_SCORES_FILE, "SPAQ")
    _image_folder(root, image_folder, "SPAQ", "Unzip the release so that its images are in TestImage/.")
    try:
        frame = pd.read_excel(scores_file, sheet_name=0, engine="openpyxl")
    except (zipfile.BadZipFile, ValueError, KeyError, OSError) as exc:
        raise DataError(f"SPAQ: {scores_file} is not a readable .xlsx workbook ({exc})") from exc
    require_columns(frame.columns, ["Image name", "MOS"], scores_file)
    names = _names(frame["Image name"], scores_file, "row", 2)
    table = pd.DataFrame({
        "image_id": names,
        "path": [f"{image_folder}/{n}" for n in names],
        "mos_raw": frame["MOS"].to_numpy(),
        "source": [f"{scores_file.name} row {i + 2}" for i in range(len(frame))],
    })
    return RawDataset(dataset="spaq", root=root, scale=ScoreScale(0.0, 100.0, True, "MOS"), table=table,
                      notes={"image_folder": image_folder})


@register("flive", "LIVE-FB / FLIVE (PaQ-2-PiQ): database/labels_image.csv with images in its subfolders")
def read_flive(root: Path, image_folder: str | None = None) -> RawDataset:
    """LIVE-FB (FLIVE), the PaQ-2-PiQ picture-quality database, image-level labels.

    Layout (FLIVE_Database / baidut/PaQ-2-PiQ repositories): ``database/labels_image.csv`` with columns
    ``name, mos`` (39,810 rows), where name is relative to ``database/``: ``voc_emotic_ava/AVA__*.jpg``,
    ``voc_emotic_ava/EMOTIC__*.jpg``, ``voc_emotic_ava/JPEGImages__*.jpg``, ``voc_emotic_ava/VOC2012__*.jpg``,
    ``blur_dataset/motion*.jpg`` / ``out_of_focus*.jpg`` and ``EE371R/rq*.jpg`` (the three EE371R images ship
    only in baidut/PaQ-2-PiQ's database/ folder, not in FLIVE_Database's). ``root`` may be the
    repository folder (holding ``database/``) or ``database/`` itself. MOS is 0-100 (0.0 occurs), higher =
    better; no standard deviation is published. Matches pyiqa's scripts/process_flive.py (columns name, mos).
    Patch labels (labels_patch.csv) and the PaQ-2-PiQ train/valid/test files (labels=640_padded.csv
    'is_valid', labels640.csv) are not read. HyperIQA/DEIQT-style copies keep labels_image.csv at the top
    and the images under database/: pass ``image_folder='database'`` (relative to root) for those.
    """
    relative = FLIVE_LABELS_FILE if (root / FLIVE_LABELS_FILE).is_file() else f"database/{FLIVE_LABELS_FILE}"
    labels_file = require_file(root, relative, "FLIVE")
    if image_folder is None:
        image_folder = str(Path(relative).parent)
    _image_folder(root, image_folder, "FLIVE", "Pass image_folder= the folder the names in "
                  f"{FLIVE_LABELS_FILE} are relative to (e.g. 'database').")
    frame = _read_csv(labels_file, "FLIVE")
    require_columns(frame.columns, ["name", "mos"], labels_file)
    names = _names(frame["name"], labels_file, "line", 2)
    prefix = "" if image_folder in ("", ".") else f"{image_folder.rstrip('/')}/"
    table = pd.DataFrame({
        "image_id": names,
        "path": [f"{prefix}{n}" for n in names],
        "mos_raw": frame["mos"].to_numpy(),
        "source": [f"{labels_file.name} line {i + 2}" for i in range(len(frame))],
    })
    return RawDataset(dataset="flive", root=root, scale=ScoreScale(0.0, 100.0, True, "MOS"), table=table,
                      notes={"labels_file": relative, "image_folder": image_folder or ".",
                             "left_out": "patch labels (labels_patch.csv); the release's own split files"})
