"""Adapters for synthetically distorted datasets: KADID-10k, TID2013, CSIQ, LIVE IQA release 2.

content_id is the reference image, so splits never share content between train and test. Published image
names are matched to the files on disk ignoring case (TID2013 mixes i01/I01 and .bmp/.BMP; re-packed CSIQ
copies differ in folder case); a name with no unambiguous match keeps its published spelling, and the
manifest's image check then reports it with the row it came from.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from qfm.data.adapters import register, require_columns, require_file
from qfm.data.adapters.matfiles import load_mat_variable, mat_numbers, mat_strings
from qfm.data.manifest import RawDataset, ScoreScale
from qfm.errors import ConfigError, DataError

# KADID-10k readme / paper (Lin, Hosu, Saupe, QoMEX 2019): distortion codes 01-25 in I<ref>_<type>_<level>.png.
KADID_TYPES = {
    1: "gaussian blur", 2: "lens blur", 3: "motion blur", 4: "color diffusion", 5: "color shift",
    6: "color quantization", 7: "color saturation 1", 8: "color saturation 2", 9: "jpeg2000", 10: "jpeg",
    11: "white noise", 12: "white noise in color component", 13: "impulse noise", 14: "multiplicative noise",
    15: "denoise", 16: "brighten", 17: "darken", 18: "mean shift", 19: "jitter", 20: "non-eccentricity patch",
    21: "pixelate", 22: "quantization", 23: "color block", 24: "high sharpen", 25: "contrast change",
}
KADID_NAME = re.compile(r"^I(\d{2})_(\d{2})_(\d{2})\.png$", re.IGNORECASE)

# TID2013 readme: distortion codes 01-24 in i<ref>_<type>_<level>.bmp.
TID2013_TYPES = {
    1: "additive gaussian noise", 2: "additive noise in color components", 3: "spatially correlated noise",
    4: "masked noise", 5: "high frequency noise", 6: "impulse noise", 7: "quantization noise",
    8: "gaussian blur", 9: "image denoising", 10: "jpeg compression", 11: "jpeg2000 compression",
    12: "jpeg transmission errors", 13: "jpeg2000 transmission errors", 14: "non eccentricity pattern noise",
    15: "local block-wise distortions of different intensity", 16: "mean shift (intensity shift)",
    17: "contrast change", 18: "change of color saturation", 19: "multiplicative gaussian noise",
    20: "comfort noise", 21: "lossy compression of noisy images", 22: "image color quantization with dither",
    23: "chromatic aberrations", 24: "sparse sampling and reconstruction",
}
TID2013_NAME = re.compile(r"^i(\d{2})_(\d{2})_(\d)\.bmp$", re.IGNORECASE)

# CSIQ: dst_type in the spreadsheet -> (folder under dst_imgs/, token in the file name).
CSIQ_TYPES = {
    "noise": ("awgn", "AWGN"), "jpeg": ("jpeg", "JPEG"), "jpeg 2000": ("jpeg2000", "jpeg2000"),
    "fnoise": ("fnoise", "fnoise"), "blur": ("blur", "BLUR"), "contrast": ("contrast", "contrast"),
}
CSIQ_SHEET = "all_by_image"
CSIQ_COLUMNS = ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"]
CSIQ_HEADER_SEARCH_ROWS = 20

# LIVE release 2 readme: dmos = [jp2k(1:227) jpeg(1:233) wn(1:174) gblur(1:174) fastfading(1:174)].
LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
LIVE_ENTRIES = sum(n for _, n in LIVE_FOLDERS)
LIVE_DMOS_SCALE = ScoreScale(0.0, 100.0, higher_is_better=False, kind="DMOS")
LIVE_REALIGNED_SCALE = ScoreScale(-5.0, 115.0, higher_is_better=False, kind="DMOS (realigned)")


class _FileIndex:
    """Finds a published relative path on disk ignoring case, listing each folder once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listings: dict[Path, dict[str, list[str]]] = {}

    def _listing(self, folder: Path) -> dict[str, list[str]]:
        if folder not in self._listings:
            names: dict[str, list[str]] = {}
            if folder.is_dir():
                with os.scandir(folder) as entries:
                    for entry in entries:
                        names.setdefault(entry.name.lower(), []).append(entry.name)
            self._listings[folder] = names
        return self._listings[folder]

    def resolve(self, relative: str) -> str:
        """The path as spelled on disk, or as published when no single file matches it."""
        folder = self.root
        for part in relative.split("/"):
            candidates = self._listing(folder).get(part.lower(), [])
            if part in candidates:
                match = part
            elif len(candidates) == 1:
                match = candidates[0]
            else:
                return relative
            folder = folder / match
        return folder.relative_to(self.root).as_posix()


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a text file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a plain text file ({exc})") from exc
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _code_name(table: dict[int, str], code: str, what: str, where: str) -> str:
    try:
        return table[int(code)]
    except KeyError:
        raise DataError(f"{where}: distortion code {code} is not one of the {len(table)} {what} types "
                        f"(01-{len(table):02d})") from None


@register("kadid10k", "KADID-10k: kadid10k/dmos.csv and images/ (I01_01_01.png, references I01.png)",
          synthetic=True)
def read_kadid10k(root: Path) -> RawDataset:
    """KADID-10k as released: ``dmos.csv`` and ``images/``.

    dmos.csv columns: dist_img (I<ref>_<type>_<level>.png), ref_img (I<ref>.png), dmos, var; one row per
    distorted image (10,125), all images (and the 81 references) in images/. dmos is the mean of 30
    degradation-category ratings on 1-5, higher = better despite its name; ``var`` is their standard
    deviation despite its name (e.g. dmos 1.1 with var 0.3 = 27 ratings of 1 and 3 of 2), so it becomes
    mos_std. Matches pyiqa's scripts/process_kadid10k.py (ref_img, dist_img, dmos, std from columns 0-3).
    Distortion type and level come from the file name (types as named in the KADID-10k readme).
    """
    scores_file = require_file(root, "dmos.csv", "KADID-10k")
    try:
        table = pd.read_csv(scores_file, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{scores_file}: not a readable CSV file ({exc})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    require_columns(table.columns, ["dist_img", "ref_img", "dmos"], scores_file)
    files = _FileIndex(root)
    rows = []
    for i, rec in enumerate(table.to_dict("records")):
        where = f"{scores_file.name} line {i + 2}"
        name = rec["dist_img"].strip()
        match = KADID_NAME.match(name)
        if not match:
            raise DataError(f"{scores_file} line {i + 2}: dist_img {name!r} is not named I<ref>_<type>_<level>.png "
                            "as in the KADID-10k release")
        if not rec["ref_img"].strip():
            raise DataError(f"{scores_file} line {i + 2}: ref_img is empty; every image needs its reference")
        rows.append({
            "image_id": name,
            "path": files.resolve(f"images/{name}"),
            "mos_raw": rec["dmos"],
            "mos_std": _std_value(rec.get("var"), f"{scores_file} line {i + 2}, var"),
            "content_id": rec["ref_img"].strip(),
            "distortion_type": _code_name(KADID_TYPES, match.group(2), "KADID-10k", where),
            "distortion_level": int(match.group(3)),
            "source": where,
        })
    notes = {"mos_std": "from column var (the standard deviation of the ratings)" if "var" in table.columns
             else "dmos.csv has no column var: mos_std is NaN",
             "direction": "column dmos is a quality score: higher is better"}
    return RawDataset(dataset="kadid10k", root=root, scale=ScoreScale(1.0, 5.0, True, "DMOS"),
                      table=pd.DataFrame(rows), synthetic=True, notes=notes)


@register("tid2013", "TID2013: mos_with_names.txt, mos_std.txt, distorted_images/, reference_images/",
          synthetic=True)
def read_tid2013(root: Path) -> RawDataset:
    """TID2013 as released: ``mos_with_names.txt``, ``mos_std.txt``, ``distorted_images/``, ``reference_images/``.

    mos_with_names.txt: one ``MOS name`` line per distorted image (3,000), e.g. ``5.51429 i01_01_1.bmp``;
    MOS on 0-9, higher = better. mos_std.txt: one standard deviation per line in the same order (read when
    present; without it mos_std is NaN and the notes say so). Names are i<ref>_<type>_<level>.bmp but the
    files on disk mix I01_01_1.bmp, i01_11_1.BMP and reference I01.BMP ... i25.bmp, so names are matched
    ignoring case, as pyiqa's scripts/process_tid.py does by hand. content_id is the reference 'I01' ...
    'I25'; distortion type (24 readme names) and level (1-5) come from the name. Matches pyiqa's
    process_tid.py and HyperIQA's TID2013Folder (folders.py).
    """
    mos_file = require_file(root, "mos_with_names.txt", "TID2013")
    files = _FileIndex(root)
    rows = []
    for line_no, text in _text_lines(mos_file):
        where = f"{mos_file.name} line {line_no}"
        fields = text.split()
        if len(fields) != 2:
            raise DataError(f"{mos_file} line {line_no}: expected 'MOS name' (two fields), found {text!r}")
        mos, name = fields
        match = TID2013_NAME.match(name)
        if not match:
            raise DataError(f"{mos_file} line {line_no}: image name {name!r} is not named "
                            "i<ref>_<type>_<level>.bmp as in the TID2013 release")
        rows.append({
            "image_id": name,
            "path": files.resolve(f"distorted_images/{name}"),
            "mos_raw": mos,
            "content_id": f"I{match.group(1)}",
            "distortion_type": _code_name(TID2013_TYPES, match.group(2), "TID2013", where),
            "distortion_level": int(match.group(3)),
            "source": where,
        })
    table = pd.DataFrame(rows)
    std_file = root / "mos_std.txt"
    if std_file.is_file():
        table["mos_std"] = _tid2013_std(std_file, len(table), mos_file)
        notes = {"mos_std": "from mos_std.txt"}
    else:
        table["mos_std"] = np.nan
        notes = {"mos_std": "mos_std.txt is absent: mos_std is NaN"}
    return RawDataset(dataset="tid2013", root=root, scale=ScoreScale(0.0, 9.0, True, "MOS"), table=table,
                      synthetic=True, notes=notes)


def _tid2013_std(std_file: Path, n_scores: int, mos_file: Path) -> list[float]:
    lines = _text_lines(std_file)
    if len(lines) != n_scores:
        raise DataError(f"{std_file} has {len(lines)} values but {mos_file.name} has {n_scores} scores; "
                        "the two files must list the same images in the same order")
    return [_std_value(text, f"{std_file} line {line_no}") for line_no, text in lines]


@register("csiq", "CSIQ: csiq.DMOS.xlsx (sheet all_by_image), dst_imgs/<type>/, src_imgs/", synthetic=True)
def read_csiq(root: Path, dmos_file: str = "csiq.DMOS.xlsx") -> RawDataset:
    """CSIQ as released: ``csiq.DMOS.xlsx``, ``dst_imgs/<type>/<image>.<TYPE>.<level>.png``, ``src_imgs/``.

    The workbook's sheet ``all_by_image`` has a few title rows, then the header (row 4, columns D-I in the
    release) image, dst_idx, dst_type, dst_lev, dmos_std, dmos, then one row per rated image (866; not
    every distorted file was rated). The header row is found, not assumed. DMOS is on 0-1, lower = better
    (0 = no visible difference). dst_type maps to folder and name token: noise -> awgn/AWGN, jpeg ->
    jpeg/JPEG, 'jpeg 2000' -> jpeg2000/jpeg2000, fnoise, blur -> blur/BLUR, contrast. content_id is the
    reference src_imgs/<image>.png. Matches the public loaders that read this workbook (sheet all_by_image,
    header found by its names, the same type mapping); file names and DMOS values agree with pyiqa's
    meta_info_CSIQDataset.csv (e.g. 1600.AWGN.1.png 0.061989), which pyiqa derives from csiq_label.txt.
    """
    xlsx = require_file(root, dmos_file, "CSIQ")
    header_at, header, cells = _csiq_sheet(xlsx)
    col = {name: header.index(name) for name in CSIQ_COLUMNS}
    files = _FileIndex(root)
    rows = []
    for excel_row, values in enumerate(cells[header_at + 1:], start=header_at + 2):
        cell = {name: _cell(values, col[name]) for name in CSIQ_COLUMNS}
        if all(v is None for v in cell.values()):
            continue  # blank padding below the table
        where = f"{xlsx.name} sheet {CSIQ_SHEET} row {excel_row}"
        image, dst_type, level = _cell_text(cell["image"]), str(cell["dst_type"] or "").strip().lower(), cell["dst_lev"]
        if not image or dst_type not in CSIQ_TYPES or not _is_whole(level):
            raise DataError(f"{xlsx} sheet {CSIQ_SHEET} row {excel_row}: expected an image name, a dst_type in "
                            f"{sorted(CSIQ_TYPES)} and a whole-number dst_lev; found image={cell['image']!r}, "
                            f"dst_type={cell['dst_type']!r}, dst_lev={level!r}")
        folder, token = CSIQ_TYPES[dst_type]
        name = f"{image}.{token}.{int(level)}.png"
        rows.append({
            "image_id": name,
            "path": files.resolve(f"dst_imgs/{folder}/{name}"),
            "mos_raw": cell["dmos"],
            "mos_std": _std_value(cell["dmos_std"], f"{xlsx} sheet {CSIQ_SHEET} row {excel_row}, dmos_std"),
            "content_id": f"{image}.png",
            "distortion_type": dst_type,
            "distortion_level": int(level),
            "source": where,
        })
    if not rows:
        raise DataError(f"{xlsx} sheet {CSIQ_SHEET}: the header is on row {header_at + 1} but no rows follow it")
    return RawDataset(dataset="csiq", root=root, scale=ScoreScale(0.0, 1.0, False, "DMOS"),
                      table=pd.DataFrame(rows), synthetic=True, notes={"scores": f"{dmos_file} sheet {CSIQ_SHEET}"})


def _csiq_sheet(xlsx: Path) -> tuple[int, list[str], list[tuple]]:
    """The rows of the all_by_image sheet, the index of its header row and the header's names."""
    import openpyxl  # only this adapter needs it
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = openpyxl.load_workbook(xlsx, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"{xlsx}: not a readable .xlsx workbook ({exc})") from exc
    try:
        if CSIQ_SHEET not in book.sheetnames:
            raise DataError(f"{xlsx}: no sheet '{CSIQ_SHEET}'; the workbook has sheets {book.sheetnames}")
        cells = list(book[CSIQ_SHEET].iter_rows(values_only=True))
    finally:
        book.close()
    for i, values in enumerate(cells[:CSIQ_HEADER_SEARCH_ROWS]):
        names = [str(v).strip().lower() if v is not None else "" for v in values]
        if "image" in names and "dmos" in names:
            require_columns([n for n in names if n], CSIQ_COLUMNS, xlsx)
            return i, names, cells
    seen = [[v for v in values if v is not None] for values in cells[:CSIQ_HEADER_SEARCH_ROWS]]
    raise DataError(f"{xlsx} sheet {CSIQ_SHEET}: no header row with columns {CSIQ_COLUMNS} in its first "
                    f"{CSIQ_HEADER_SEARCH_ROWS} rows; found {[row for row in seen if row]}")


def _cell(values: tuple, index: int):
    """One cell of a sheet row; missing and blank cells are None."""
    value = values[index] if index < len(values) else None
    return None if isinstance(value, str) and not value.strip() else value


def _std_value(value, where: str) -> float:
    """A published standard deviation: a number, or NaN when the cell is empty; anything else fails."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return np.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a standard deviation (a number), found {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise DataError(f"{where}: a standard deviation must be a finite number >= 0, found {value!r}")
    return number


def _cell_text(value) -> str:
    """A spreadsheet cell as text; whole numbers lose the '.0' (CSIQ's image 1600 is a number cell)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _is_whole(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and float(value).is_integer()


def _as_bool(value, option: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes"}:
        return True
    if text in {"false", "0", "no"}:
        return False
    raise ConfigError(f"option {option} must be true or false, got {value!r}")


@register("live", "LIVE IQA release 2: dmos.mat (or dmos_realigned.mat), refnames_all.mat, jp2k/ jpeg/ wn/ "
          "gblur/ fastfading/", synthetic=True)
def read_live(root: Path, realigned: bool = False) -> RawDataset:
    """LIVE IQA release 2 (databaserelease2) as released.

    Scores: ``dmos.mat`` (``dmos``, ``orgs``; default, as pyiqa's scripts/process_live.py) or, with
    realigned=True, ``dmos_realigned.mat`` (``dmos_new``, ``dmos_std``, ``orgs``; as HyperIQA/DEIQT's
    LIVEFolder). ``refnames_all.mat`` (``refnames_all``) names each entry's reference in refimgs/. The 982
    entries are, in order, jp2k/img1..227.bmp, jpeg/img1..233.bmp, wn/, gblur/ and fastfading/
    img1..174.bmp (readme); each folder's info.txt repeats the reference names and is not needed. Entries
    with orgs == 1 are the reference images shown in the study (203 in the release) and are left out, as
    every standard loader does. DMOS is lower = better; dmos.mat values lie in [0, 100] (distorted images
    about 18-85), declared [0, 100]; realigned values lie in about [-3, 112], declared [-5, 115].
    No distortion level is published (info.txt holds codec parameters, not levels): distortion_level is NaN.
    """
    realigned = _as_bool(realigned, "realigned")
    refs_file = require_file(root, "refnames_all.mat", "LIVE release 2")
    if realigned:
        scores_file = require_file(root, "dmos_realigned.mat", "LIVE release 2 (realigned=true)")
        dmos = mat_numbers(load_mat_variable(scores_file, "dmos_new"))
        std = mat_numbers(load_mat_variable(scores_file, "dmos_std"))
        scale = LIVE_REALIGNED_SCALE
    else:
        scores_file = require_file(root, "dmos.mat", "LIVE release 2")
        dmos = mat_numbers(load_mat_variable(scores_file, "dmos"))
        std = np.full(len(dmos), np.nan)
        scale = LIVE_DMOS_SCALE
    orgs = mat_numbers(load_mat_variable(scores_file, "orgs"))
    refs = mat_strings(load_mat_variable(refs_file, "refnames_all"))
    lengths = {"dmos": len(dmos), "orgs": len(orgs), "dmos_std": len(std), "refnames_all": len(refs)}
    if any(n != LIVE_ENTRIES for n in lengths.values()):
        raise DataError(f"LIVE release 2: {scores_file.name} and {refs_file.name} must each hold {LIVE_ENTRIES} "
                        f"entries ({' + '.join(str(n) for _, n in LIVE_FOLDERS)} in the order "
                        f"{[f for f, _ in LIVE_FOLDERS]}); found {lengths}")
    bad = [i for i, v in enumerate(orgs) if v not in (0.0, 1.0)]
    if bad:
        raise DataError(f"{scores_file}: orgs must be 0 (distorted) or 1 (reference); entries {bad[:10]} are not")
    files = _FileIndex(root)
    rows, index = [], 0
    for folder, count in LIVE_FOLDERS:
        for k in range(1, count + 1):
            if orgs[index] == 0:
                name = f"{folder}/img{k}.bmp"
                rows.append({"image_id": name, "path": files.resolve(name), "mos_raw": dmos[index],
                             "mos_std": std[index], "content_id": refs[index], "distortion_type": folder,
                             "source": f"{scores_file.name}[{index}]"})
            index += 1
    notes = {"scores": scores_file.name,
             "left_out": f"{int(orgs.sum())} entries with orgs == 1 (reference images shown in the study)"}
    return RawDataset(dataset="live", root=root, scale=scale, table=pd.DataFrame(rows), synthetic=True,
                      notes=notes)
