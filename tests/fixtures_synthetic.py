"""Tiny copies of the synthetic datasets' release layouts, written in the real file formats.

Each builder writes score files exactly as the release names and shapes them (CSV, text, .xlsx with
openpyxl, MATLAB v5 .mat with cell arrays of strings) and small real images, and returns what it wrote
so tests can compare the adapter's output with known inputs.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import scipy.io
from PIL import Image

LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
LIVE_REFS = ("bikes.bmp", "building2.bmp", "buildings.bmp", "caps.bmp", "carnivaldolls.bmp", "cemetry.bmp")


def image_bytes(fmt: str, seed: int, size: int = 8) -> bytes:
    """A small real RGB image encoded in fmt ('PNG' or 'BMP')."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_kadid(root: Path, refs=(1, 2, 3, 4, 5), types=(1, 10), levels=(1, 3)) -> pd.DataFrame:
    """kadid10k/: dmos.csv (dist_img, ref_img, dmos, var) and images/ with distorted and reference PNGs."""
    png = image_bytes("PNG", 0)
    rows = []
    for r in refs:
        _write(root / "images" / f"I{r:02d}.png", png)
        for t in types:
            for lev in levels:
                name = f"I{r:02d}_{t:02d}_{lev:02d}.png"
                _write(root / "images" / name, png)
                rows.append({"dist_img": name, "ref_img": f"I{r:02d}.png",
                             "dmos": round(1.0 + ((r * 7 + t * 3 + lev) % 40) / 10, 2), "var": 0.5})
    table = pd.DataFrame(rows)
    table.loc[0, ["dmos", "var"]] = [4.57, 0.496]  # the release's first row
    table.to_csv(root / "dmos.csv", index=False)
    return table


def make_tid2013(root: Path, refs=(1, 2, 3, 4, 25), types=(1, 11), levels=(1, 2), with_std: bool = True) -> list:
    """tid2013/: mos_with_names.txt ('MOS name'), mos_std.txt, distorted_images/, reference_images/.

    Names in the score file are lower case; on disk, as in the release, the first level of each reference's
    first type is I01_01_1.bmp, type 11 level 1 is I01_11_1.BMP, and reference 25 is i25.bmp.
    """
    bmp = image_bytes("BMP", 1)
    written = []
    for r in refs:
        _write(root / "reference_images" / (f"i{r:02d}.bmp" if r == 25 else f"I{r:02d}.BMP"), bmp)
        for t in types:
            for lev in levels:
                name = f"i{r:02d}_{t:02d}_{lev}.bmp"
                on_disk = name
                if t == types[0] and lev == 1:
                    on_disk = "I" + name[1:]
                elif t == 11 and lev == 1:
                    on_disk = name.upper()
                _write(root / "distorted_images" / on_disk, bmp)
                mos = round(0.5 + ((r * 5 + t + lev * 3) % 60) / 10, 5)
                written.append({"name": name, "on_disk": on_disk, "mos": mos, "std": round(0.1 + lev / 100, 5)})
    written[0].update(mos=5.51429, std=0.13013)  # the release's first line
    lines = [f"{w['mos']:.5f} {w['name']}" for w in written]
    (root / "mos_with_names.txt").write_text("\r\n".join(lines) + "\r\n")
    if with_std:
        (root / "mos_std.txt").write_text("\n".join(f"{w['std']:.5f}" for w in written) + "\n")
    return written


CSIQ_TOKENS = {"noise": ("awgn", "AWGN"), "jpeg": ("jpeg", "JPEG"), "jpeg 2000": ("jpeg2000", "jpeg2000"),
               "fnoise": ("fnoise", "fnoise"), "blur": ("blur", "BLUR"), "contrast": ("contrast", "contrast")}


def make_csiq(root: Path, images=(1600, "aerial_city", "boston", "bridge", "cactus"),
              types=("noise", "jpeg 2000", "contrast"), levels=(1, 2), header=None, sheet="all_by_image") -> list:
    """CSIQ/: csiq.DMOS.xlsx (title rows, header on row 4 from column D), dst_imgs/<type>/, src_imgs/.

    The image 1600 is a number cell, as in the release. One distorted file per type is left unrated
    (present on disk, absent from the sheet), as in the release.
    """
    png = image_bytes("PNG", 2)
    book = openpyxl.Workbook()
    ws = book.active
    ws.title = sheet
    ws["A1"] = "CSIQ DMOS"
    ws["A2"] = "sorted by image"
    ws.append([])
    ws.append([None, None, None, *(header or ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"])])
    book.create_sheet("all_by_distortion")["A1"] = "not read"
    written = []
    for image in images:
        _write(root / "src_imgs" / f"{image}.png", png)
        for idx, dst_type in enumerate(types, start=1):
            folder, token = CSIQ_TOKENS.get(dst_type, (dst_type.replace(" ", ""), dst_type))
            for lev in levels:
                dmos = round(((len(str(image)) * 13 + idx * 7 + lev * 11) % 97) / 100, 6)
                ws.append([None, None, None, image, idx, dst_type, lev, 0.05, dmos])
                _write(root / "dst_imgs" / folder / f"{image}.{token}.{lev}.png", png)
                written.append({"image_id": f"{image}.{token}.{lev}.png", "image": str(image), "dst_type": dst_type,
                                "level": lev, "dmos": dmos, "path": f"dst_imgs/{folder}/{image}.{token}.{lev}.png"})
            _write(root / "dst_imgs" / folder / f"{image}.{token}.{max(levels) + 1}.png", png)  # unrated
    ws.append([])
    book.save(root / "csiq.DMOS.xlsx")
    return written


def live_arrays(seed: int = 0) -> dict:
    """The 982 entries of LIVE release 2 in the published order: folder, index, reference, orgs, scores."""
    rng = np.random.default_rng(seed)
    folders, numbers = [], []
    for folder, count in LIVE_FOLDERS:
        folders += [folder] * count
        numbers += list(range(1, count + 1))
    n = len(folders)
    orgs = (np.arange(n) % 5 == 0).astype(float)  # some entries are the reference images
    dmos = np.where(orgs == 1, 0.0, np.round(rng.uniform(18, 85, n), 4))
    dmos_new = np.where(orgs == 1, 0.0, np.round(rng.uniform(0, 100, n), 4))
    dmos_new[[1, 2]] = [-2.5, 111.0]  # realigned values fall a little outside 0-100
    refs = [LIVE_REFS[i % len(LIVE_REFS)] for i in range(n)]
    return {"folders": folders, "numbers": numbers, "orgs": orgs, "dmos": dmos, "dmos_new": dmos_new,
            "dmos_std": np.round(rng.uniform(5, 15, n), 4), "refs": refs}


def cell_array(strings: list[str]) -> np.ndarray:
    """A 1 x n MATLAB cell array of strings, as refnames_all.mat holds."""
    cells = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        cells[0, i] = s
    return cells


def row(values) -> np.ndarray:
    """A 1 x n MATLAB row vector, as the LIVE .mat files hold their scores."""
    return np.asarray(values, dtype=float).reshape(1, -1)


def make_live(root: Path, arrays: dict | None = None, images: bool = True) -> dict:
    """databaserelease2/: dmos.mat, dmos_realigned.mat, refnames_all.mat, refimgs/ and the five folders."""
    arrays = arrays or live_arrays()
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "dmos.mat", {"dmos": row(arrays["dmos"]), "orgs": row(arrays["orgs"])})
    scipy.io.savemat(root / "dmos_realigned.mat", {"dmos_new": row(arrays["dmos_new"]),
                                                   "dmos_std": row(arrays["dmos_std"]), "orgs": row(arrays["orgs"])})
    scipy.io.savemat(root / "refnames_all.mat", {"refnames_all": cell_array(arrays["refs"])})
    if images:
        bmp = image_bytes("BMP", 3, size=4)
        for ref in LIVE_REFS:
            _write(root / "refimgs" / ref, bmp)
        for folder, number, org in zip(arrays["folders"], arrays["numbers"], arrays["orgs"]):
            if org == 0:
                _write(root / folder / f"img{number}.bmp", bmp)
        for folder, _ in LIVE_FOLDERS:
            (root / folder / "info.txt").write_text("bikes.bmp img1.bmp 0.5\n")
    return arrays
